"""Claims: the relay's signed proof that a tunnel's names belong to a token.

A reconnecting agent shows a claim to get its label and TCP port back. The
relay signs claims with its claim secret (:mod:`~burrow.relay.claimsecret`),
which a restarted relay (and every worker) has and a new TLS key does not
change. Sans-IO: key bytes in, strings out.

A claim reads ``<label>.<tcp port or 0>.<mac>``, the mac being the first
:data:`CLAIM_MAC_HEX` hex digits of HMAC-SHA256 keyed with the claim secret
(first the relay's TLS key file, its PEM bytes, which signs alike) over
``burrow claims v1<label>.<tcp port or 0>.<token id>``.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Final

from burrow.wire import names

# Hex digits of HMAC-SHA256 in a claim: 128 bits, beyond guessing.
CLAIM_MAC_HEX: Final = 32

# Leads every message the relay's TLS key signs as a claim key: nothing else
# it could be asked to sign starts so.
CLAIM_KEY_CONTEXT: Final = b"burrow claims v1"

# A TCP port has at most five digits; longer is not a claim we signed.
_MAX_PORT_DIGITS: Final = 5


@dataclass(frozen=True)
class Claim:
    """What a valid claim proves: a label, and the TCP port that went with it."""

    label: str
    tcp_port: int | None


class ClaimSigner:
    """Signs and checks claims with ``secret`` (the relay's claim secret)."""

    def __init__(self, secret: bytes) -> None:
        self._key = hmac.new(secret, CLAIM_KEY_CONTEXT, hashlib.sha256)

    def sign(self, label: str, tcp_port: int | None, token_id: str) -> str:
        """The claim on ``label`` (and ``tcp_port``) for the token ``token_id`` only."""
        body = f"{label}.{tcp_port or 0}"
        return f"{body}.{self._mac(body, token_id)}"

    def check(self, claim: str, token_id: str) -> Claim | None:
        """What ``claim`` proves for the token ``token_id``, or None if it proves nothing."""
        parts = claim.split(".")
        if len(parts) != 3:
            return None
        label, port, mac = parts
        if not names.is_label(label) or not (port.isdigit() and len(port) <= _MAX_PORT_DIGITS):
            return None
        # As bytes: compare_digest refuses str that is not ASCII, and this one is anyone's.
        expected = self._mac(f"{label}.{port}", token_id)
        if not hmac.compare_digest(mac.encode(), expected.encode()):
            return None
        return Claim(label, int(port) or None)

    def _mac(self, body: str, token_id: str) -> str:
        mac = self._key.copy()
        mac.update(f"{body}.{token_id}".encode())
        return mac.hexdigest()[:CLAIM_MAC_HEX]
