"""The fleet document: the operator's signed list of relays and of revoked tokens.

One line of text (a JWS compact serialization, ``typ`` ``burrow-fleet+jwt``)
signed with the token-signing key, so that every relay and agent can check
it with the public key it already holds. Relays read it from a file and hand
newer copies to agents in ``welcome.fleet`` (docs/protocol.md).

Signing and verifying import PyJWT and cryptography when called; reading a
document without verifying it (:func:`read_unverified`) needs only base64 and
JSON, so an agent, which must not load them, can read one it keeps.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from burrow.exception import InvalidError
from burrow.wire import names, protocol

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    from burrow.tokens import KeyRing

# The JWS header's `typ`: what tells a fleet document from a token signed by
# the same key, both ways (burrow.tokens refuses this type as a token).
FLEET_TYPE: Final = "burrow-fleet+jwt"

# The one algorithm, as for tokens: pinning it stops "alg": "none" forgeries.
FLEET_ALGORITHM: Final = "EdDSA"

# The longest document, so that it rides in a `welcome` frame (see protocol.py).
MAX_FLEET_SIZE: Final = protocol.MAX_FLEET_SIZE

# A relay's name and region are words for people and logs ("r1", "eu-west").
MAX_NAME_LENGTH: Final = 64
MAX_REGION_LENGTH: Final = 64

# Weights say how much of the fleet's load a relay should take, relative to
# the others; a thousandfold spread is more than any real fleet needs.
MAX_WEIGHT: Final = 1000

# Token ids are 16 characters; a little room for ids minted by other tools.
MAX_TOKEN_ID_LENGTH: Final = 128

# The last second `datetime` can print, as for tokens (burrow.tokens.MAX_TIMESTAMP).
MAX_TIMESTAMP: Final = 253402300799

# Serials are compared as integers; JSON readers elsewhere lose precision past 2**53.
MAX_SERIAL: Final = 2**53

_SEGMENT_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_WORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# burrow's token ids are base64url; other tools' may add '.' or '~' (RFC 3986's unreserved).
_TOKEN_ID_RE = re.compile(r"[A-Za-z0-9._~-]+")

FleetErrorReason = Literal["malformed", "bad-signature", "unknown-key", "expired"]


class FleetError(InvalidError):
    """A fleet document was refused; ``reason`` says why in one word."""

    def __init__(self, reason: FleetErrorReason, message: str) -> None:
        super().__init__(message)
        self.reason: FleetErrorReason = reason


@dataclass(frozen=True)
class FleetRelay:
    """One relay of the fleet."""

    name: str
    """Its short name for people and logs (``r1``)."""

    address: str
    """Where agents dial it: ``host:port`` (``r1.example.com:443``)."""

    region: str = ""
    """Where it stands (``eu-west``), for people and for choosing; may be empty."""

    weight: int = 1
    """Its share of new agents relative to the others' (0 takes none: draining)."""


@dataclass(frozen=True)
class Fleet:
    """What a fleet document says."""

    serial: int
    """Its number; a newer document has a greater one (1 or more)."""

    expires: int
    """When it stops being valid, in seconds since the Unix epoch."""

    relays: tuple[FleetRelay, ...]
    """The fleet's relays, in the operator's order."""

    revoked: frozenset[str]
    """Token ids (``jti``) that every relay refuses."""

    issued: int = 0
    """When it was signed, in seconds since the epoch."""

    key_id: str | None = None
    """The ``kid`` of the key that signed it (from its header)."""

    def expired(self, now: float) -> bool:
        return self.expires <= now


def _utc(timestamp: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


# -- reading the content (no cryptography) -------------------------------------


def _bad(message: str) -> FleetError:
    return FleetError("malformed", f"fleet document is malformed: {message}")


def _int(obj: dict[str, Any], name: str, low: int, high: int) -> int:
    value = obj.get(name)
    # `type(...) is int`: JSON true must not count as 1.
    if type(value) is not int or not low <= value <= high:
        raise _bad(f"{name!r} is not an integer from {low} to {high}")
    return value


def _text(
    value: object,
    what: str,
    limit: int,
    *,
    empty: bool = False,
    pattern: re.Pattern[str] = _WORD_RE,
) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise _bad(f"{what} is not a string of at most {limit} characters")
    if value == "" and empty:
        return value
    if pattern.fullmatch(value) is None:
        raise _bad(f"{what} {value[:limit]!r} is not letters, digits, '.', '_' or '-'")
    return value


def check_address(text: str) -> str:
    """``text`` if it is a relay's ``host:port``; :class:`FleetError` if not."""
    try:
        host, port = names.parse_address(text, 0)
    except InvalidError as exc:
        raise _bad(str(exc)) from None
    if port == 0:
        raise _bad(f"relay address {text!r} has no port (host:port)")
    del host
    return text


def _relay(item: object, index: int) -> FleetRelay:
    if not isinstance(item, dict):
        raise _bad(f"relay {index} is not an object")
    unknown = set(item) - {"name", "address", "region", "weight"}
    if unknown:
        raise _bad(f"relay {index} has unknown members: {', '.join(sorted(unknown))[:200]}")
    address = item.get("address")
    if not isinstance(address, str) or len(address) > names.MAX_DOMAIN_LENGTH + 8:
        raise _bad(f"relay {index}'s 'address' is not host:port")
    return FleetRelay(
        name=_text(item.get("name"), f"relay {index}'s name", MAX_NAME_LENGTH),
        address=check_address(address),
        region=_text(
            item.get("region", ""), f"relay {index}'s region", MAX_REGION_LENGTH, empty=True
        ),
        weight=_int(item, "weight", 0, MAX_WEIGHT) if "weight" in item else 1,
    )


def parse_payload(payload: bytes, key_id: str | None = None) -> Fleet:
    """The fleet a document's payload (its JSON) describes; checks every member."""
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad("its payload is not UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise _bad("its payload is not a JSON object")
    relays = obj.get("relays")
    if not isinstance(relays, list):
        raise _bad("'relays' is not a list")
    fleet_relays = tuple(_relay(item, index) for index, item in enumerate(relays, start=1))
    seen = set()
    for relay in fleet_relays:
        if relay.name in seen:
            raise _bad(f"two relays are named {relay.name!r}")
        seen.add(relay.name)
    revoked = obj.get("revoked", [])
    if not isinstance(revoked, list):
        raise _bad("'revoked' is not a list of token ids")
    ids = frozenset(
        _text(token_id, "revoked token id", MAX_TOKEN_ID_LENGTH, pattern=_TOKEN_ID_RE)
        for token_id in revoked
    )
    return Fleet(
        serial=_int(obj, "serial", 1, MAX_SERIAL),
        expires=_int(obj, "expires", 0, MAX_TIMESTAMP),
        relays=fleet_relays,
        revoked=ids,
        issued=_int(obj, "issued", 0, MAX_TIMESTAMP) if "issued" in obj else 0,
        key_id=key_id,
    )


def _unb64(segment: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise _bad("a segment is not base64url") from None


def _segments(text: str) -> list[str]:
    if not isinstance(text, str) or len(text) > MAX_FLEET_SIZE:
        raise FleetError(
            "malformed", f"fleet document is not a string of at most {MAX_FLEET_SIZE} characters"
        )
    text = text.strip()
    if _SEGMENT_RE.fullmatch(text) is None:
        raise _bad("not three base64url segments")
    return text.split(".")


def _header(segment: str) -> dict[str, Any]:
    try:
        header = json.loads(_unb64(segment).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad("its header is not UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise _bad("its header is not a JSON object")
    if header.get("typ") != FLEET_TYPE:
        raise _bad(f"its type is {str(header.get('typ'))[:40]!r}, not {FLEET_TYPE!r}")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise _bad("'kid' is not a string")
    return header


def read_unverified(text: str) -> Fleet:
    """What ``text`` says, WITHOUT checking its signature or expiry.

    Only for a document already verified (a copy kept after :func:`verify`)
    or taken as hints: anyone can write one that reads well. Needs neither
    PyJWT nor cryptography. Raises :class:`FleetError` (``malformed``).
    """
    head, body, _ = _segments(text)
    header = _header(head)
    return parse_payload(_unb64(body), header.get("kid"))


# -- signing and verifying (PyJWT and cryptography, imported on use) -----------


def sign(
    key: Ed25519PrivateKey,
    *,
    serial: int,
    expires: int,
    relays: Iterable[FleetRelay],
    revoked: Iterable[str] = (),
    now: float | None = None,
) -> str:
    """A fleet document, signed with ``key`` (the token-signing key) and its ``kid``.

    Raises :class:`InvalidError` for content a relay would refuse, or a
    document longer than :data:`MAX_FLEET_SIZE`.
    """
    import jwt

    from burrow.tokens import key_id

    payload = {
        "serial": serial,
        "issued": int(time.time() if now is None else now),
        "expires": expires,
        "relays": [
            {"name": r.name, "address": r.address, "region": r.region, "weight": r.weight}
            for r in relays
        ],
        "revoked": sorted(set(revoked)),
    }
    # The same checks a relay makes: a document that signs is one relays take.
    parse_payload(json.dumps(payload).encode())
    headers = {"kid": key_id(key), "typ": FLEET_TYPE}
    text = jwt.encode(payload, key, algorithm=FLEET_ALGORITHM, headers=headers)
    if len(text) > MAX_FLEET_SIZE:
        raise InvalidError(
            f"the fleet document is {len(text)} characters, more than {MAX_FLEET_SIZE}: "
            "leave out revoked ids of tokens that have expired"
        )
    return text


def verify(text: str, keys: KeyRing | Ed25519PublicKey, *, now: float | None = None) -> Fleet:
    """What ``text`` says, if the key its ``kid`` names (any key of ``keys``
    when it has none) signed it and it has not expired at ``now``.

    Raises :class:`FleetError` for every way a document can be bad, whatever the input.
    """
    import jwt
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from burrow.tokens import KeyRing, TokenError

    header = _header(_segments(text)[0])
    kid = header.get("kid")
    ring = KeyRing.of([keys]) if isinstance(keys, Ed25519PublicKey) else keys
    try:
        candidates = ring.candidates(kid, "fleet document")
    except TokenError as exc:
        raise FleetError("unknown-key", str(exc)) from None
    payload: bytes | None = None
    for key in candidates:
        try:
            payload = jwt.api_jws.decode(text.strip(), key, algorithms=[FLEET_ALGORITHM])
            break
        except (jwt.InvalidSignatureError, jwt.InvalidAlgorithmError):
            continue
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            raise _bad("its signature cannot be read") from None
    if payload is None:
        raise FleetError("bad-signature", "fleet document signature is not valid")
    fleet = parse_payload(payload, kid)
    if fleet.expired(time.time() if now is None else now):
        raise FleetError(
            "expired", f"fleet document {fleet.serial} expired at {_utc(fleet.expires)}"
        )
    return fleet


# -- the operator's list of relays ----------------------------------------------


def parse_relays_file(text: str) -> tuple[FleetRelay, ...]:
    """The relays in a TOML file of ``[[relay]]`` tables (name, address, region, weight)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidError(f"the relays file is not TOML: {exc}") from None
    unknown = set(data) - {"relay"}
    if unknown:
        raise InvalidError(
            f"the relays file has unknown keys: {', '.join(sorted(unknown))}; "
            "it holds [[relay]] tables only"
        )
    items = data.get("relay", [])
    if not isinstance(items, list) or not items:
        raise InvalidError("the relays file holds no [[relay]] tables")
    try:
        relays = tuple(_relay(item, index) for index, item in enumerate(items, start=1))
    except FleetError as exc:
        raise InvalidError(str(exc).replace("fleet document is malformed", "relays file")) from None
    if len({relay.name for relay in relays}) != len(relays):
        raise InvalidError("the relays file names a relay twice")
    return relays
