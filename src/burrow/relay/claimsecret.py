"""The claim secret: the key claims are signed with, kept in the relay's state dir.

Claims used to be signed with the TLS key file itself, so a renewal with a
fresh key cost every reconnecting agent its names. The secret now lives in
``<state dir>/claim-secret`` (mode 0600). A relay that has none yet derives
it from its TLS key, giving the very HMAC key it signed with before, so the
claims agents already hold stay valid; after that the TLS key may change.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import stat
from pathlib import Path
from typing import Final

from burrow.exception import InvalidError
from burrow.net.files import write_atomically

log = logging.getLogger("burrow.relay")

CLAIM_SECRET_FILE: Final = "claim-secret"

# Bytes of secret: SHA-256's output, all HMAC-SHA256 can use of a key.
CLAIM_SECRET_BYTES: Final = 32

# SHA-256's block size. HMAC hashes a longer key first (RFC 2104 section 3),
# so HMAC keyed with a PEM file (always longer) is HMAC keyed with its SHA-256.
_HMAC_BLOCK: Final = 64


def derive(tls_key_pem: bytes) -> bytes:
    """The secret equal, as an HMAC-SHA256 key, to the TLS key file's bytes."""
    if len(tls_key_pem) <= _HMAC_BLOCK:
        raise InvalidError("a TLS key file that short is no PEM key")
    return hashlib.sha256(tls_key_pem).digest()


def load_or_create(state_dir: Path | None, tls_key: Path) -> bytes:
    """The relay's claim secret: read from ``state_dir``, or made there now.

    A new secret is derived from the TLS key file ``tls_key`` when it can be
    read (claims signed before stay valid), and random otherwise. Without a
    ``state_dir`` it is derived from ``tls_key`` every time, as before.
    """
    if state_dir is None:
        return derive(_read_key(tls_key))
    path = state_dir / CLAIM_SECRET_FILE
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return _create(state_dir, path, tls_key)
    except OSError as exc:
        raise InvalidError(f"cannot read the claim secret {path}: {exc.strerror}") from exc
    try:
        secret = bytes.fromhex(text.strip())
    except ValueError:
        secret = b""
    if len(secret) < CLAIM_SECRET_BYTES:
        raise InvalidError(
            f"the claim secret {path} is damaged: restore it from a backup, or delete it "
            "(agents then lose their names when they next reconnect)"
        )
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        log.warning("the claim secret %s can be read by others: chmod 600 it", path)
    return secret


def _read_key(tls_key: Path) -> bytes:
    try:
        return tls_key.read_bytes()
    except OSError as exc:
        raise InvalidError(f"cannot read private key {tls_key}: {exc.strerror}") from exc


def _create(state_dir: Path, path: Path, tls_key: Path) -> bytes:
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidError(f"cannot create the state dir {state_dir}: {exc.strerror}") from exc
    if tls_key.exists():
        secret = derive(_read_key(tls_key))
        origin = f"derived from {tls_key}: claims made before stay valid"
    else:
        # No key yet (a certificate still to be issued): no claim was ever signed.
        secret = secrets.token_bytes(CLAIM_SECRET_BYTES)
        origin = "random"
    write_atomically(path, secret.hex().encode() + b"\n", 0o600)
    log.info("wrote the claim secret %s (%s); back it up", path, origin)
    return secret
