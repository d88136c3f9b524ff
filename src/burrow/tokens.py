"""Signed agent tokens: minted with a private key, checked with only the public key.

A relay holds the Ed25519 public key and nothing else, so any relay in a
fleet can admit an agent without a database. Tokens are JWTs signed with EdDSA.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from burrow.exception import AuthError, InvalidError
from burrow.wire import names

TOKEN_ISSUER = "burrow"

# The one algorithm a relay accepts. Pinning it is what stops "alg": "none"
# and HS256-keyed-with-the-public-key forgeries.
TOKEN_ALGORITHM = "EdDSA"

# A burrow token is about 250 characters; anything far larger is not one of
# ours, and refusing it early bounds the work an unauthenticated peer can cause.
MAX_TOKEN_LENGTH = 4096

# Keeps a minted token well under MAX_TOKEN_LENGTH and log lines readable.
MAX_SUBJECT_LENGTH = 256

# 9999-12-31T23:59:59Z, the last second `datetime` can show; a timestamp
# beyond it cannot be printed in an error message, so no token may carry one.
MAX_TIMESTAMP = 253402300799

# A token living a century is as good as "never"; larger values only risk
# overflowing MAX_TIMESTAMP. Say "never" instead.
MAX_TTL_SECONDS = 100 * 365 * 86400

# Default clock skew tolerated between the machine that minted and the relay.
DEFAULT_LEEWAY_SECONDS = 30

# 12 random bytes: enough that two token ids never collide, short in logs.
TOKEN_ID_BYTES = 12

# A token's subject shown beside its id in a revocation list: enough to
# recognise it, short enough to keep the list one readable line per token.
MAX_NOTE_LENGTH = 64

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"([0-9]{1,10})([smhdw])")
_NEVER = "never"
# A JWT is three base64url segments; checking the characters first means
# PyJWT only ever sees ASCII of the right shape.
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

# A token may name the relays it is for (its `aud`); more than this is not a
# token anyone meant to write, and each name is a relay's domain.
MAX_TOKEN_RELAYS = 64

# A key id is this many hex digits of the SHA-256 of the raw public key: 64
# bits, so two keys of one operator never share one, and short in logs.
KEY_ID_HEX_DIGITS = 16

# What a token's header may say it is (RFC 7519 §5.1); anything else, such as a
# fleet document's "burrow-fleet+jwt", is not a token even if the key signed it.
_TOKEN_TYPES = frozenset({"JWT", "jwt"})

TokenErrorReason = Literal[
    "malformed",
    "bad-signature",
    "unknown-key",
    "expired",
    "not-yet-valid",
    "revoked",
    "wrong-relay",
]


@dataclass(frozen=True)
class TokenGrant:
    """What a verified token grants the agent presenting it (its JWT payload, checked)."""

    subject: str
    """Who the token was minted for (a user, a team, a CI job); shown in relay logs."""

    token_id: str
    """Random id unique to this token (the JWT ``jti``), for logs and revocation."""

    issued_at: int
    """When the token was minted, in seconds since the Unix epoch."""

    expires_at: int | None
    """When the token stops being accepted, in seconds since the epoch; None for never."""

    max_tunnels: int | None
    """How many tunnels a session with this token may hold open at once; None for no limit."""

    not_before: int | None = None
    """When the token starts being accepted (the JWT ``nbf``); None for from its issue."""

    relays: tuple[str, ...] | None = None
    """The domains of the relays that accept it (the JWT ``aud``); None for every relay."""


class TokenError(AuthError):
    """A token was refused; ``reason`` says why in one word the caller can match on."""

    def __init__(self, reason: TokenErrorReason, message: str) -> None:
        super().__init__(message)
        self.reason: TokenErrorReason = reason


def _utc(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# Keys and key files


def generate_signing_key() -> Ed25519PrivateKey:
    """A new private key for minting tokens."""
    return Ed25519PrivateKey.generate()


def public_key_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The PEM (SubjectPublicKeyInfo) of the key that verifies tokens ``key`` signs."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_id(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The id (``kid``) of the key that verifies what ``key`` signs: the first
    16 hex digits of the SHA-256 of its raw public bytes.

    Computed, never chosen, so every relay holding the public key knows it.
    """
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_HEX_DIGITS]


@dataclass(frozen=True)
class KeyRing:
    """The public keys a relay accepts tokens and fleet documents from, by key id.

    Several at once so that the signing key can be rotated with no outage:
    relays hold the old and the new key while tokens of both are about.
    """

    keys: Mapping[str, Ed25519PublicKey]
    """Each key by its :func:`key_id`."""

    @classmethod
    def of(cls, keys: Iterable[Ed25519PublicKey]) -> KeyRing:
        ring = {key_id(key): key for key in keys}
        if not ring:
            raise InvalidError("no token public key given")
        return cls(ring)

    def __len__(self) -> int:
        return len(self.keys)

    def candidates(self, kid: str | None, what: str) -> list[Ed25519PublicKey]:
        """The keys to check a signature with: the one ``kid`` names, or every key
        when there is no ``kid`` (what was signed before key ids). ``what`` ("token",
        "fleet document") starts the message of an unknown ``kid``."""
        if kid is None:
            return list(self.keys.values())
        key = self.keys.get(kid)
        if key is None:
            raise TokenError(
                "unknown-key",
                f"{what} is signed with key {kid[:32]!r}, which this relay does not hold "
                f"(it holds {', '.join(sorted(self.keys))})",
            )
        return [key]


def _ring(keys: Ed25519PublicKey | KeyRing) -> KeyRing:
    return keys if isinstance(keys, KeyRing) else KeyRing.of([keys])


def _write_new_file(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL makes "refuse to overwrite" atomic: no window in which an
    # existing key could be clobbered, and the mode applies from creation.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise InvalidError(f"{path} already exists; refusing to overwrite a key") from None
    except OSError as exc:
        raise InvalidError(f"cannot create {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise InvalidError(f"cannot write {path}: {exc.strerror}") from exc


def write_signing_key(key: Ed25519PrivateKey, path: Path) -> None:
    """Save ``key`` as unencrypted PKCS#8 PEM, readable by its owner only."""
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_new_file(path, pem, 0o600)


def write_public_key(key: Ed25519PrivateKey | Ed25519PublicKey, path: Path) -> None:
    """Save the public half of ``key`` as PEM, for relays; refuses to overwrite, like the key."""
    _write_new_file(path, public_key_pem(key), 0o644)


def _read_key_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidError(f"cannot read key file {path}: {exc.strerror}") from exc


def read_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load a key saved by :func:`write_signing_key`."""
    data = _read_key_file(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise InvalidError(
            f"{path} is not an unencrypted PEM private key (burrow token signing key)"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def read_public_key(path: Path) -> Ed25519PublicKey:
    """Load a key saved by :func:`write_public_key`."""
    data = _read_key_file(path)
    if b"PRIVATE KEY" in data:
        # Refuse outright, rather than derive the public key: a relay should
        # never be handed the key that mints tokens.
        raise InvalidError(
            f"{path} holds a private key; give the relay the public key file instead"
        )
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidError(f"{path} is not a PEM public key (burrow token public key)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


def read_public_keys(paths: Iterable[Path]) -> KeyRing:
    """The keys in ``paths``: key files, or directories whose ``*.pem`` are key files."""
    keys: list[Ed25519PublicKey] = []
    for path in paths:
        if path.is_dir():
            found = sorted(path.glob("*.pem"))
            if not found:
                raise InvalidError(f"{path} holds no *.pem public key files")
            keys.extend(read_public_key(item) for item in found)
        else:
            keys.append(read_public_key(path))
    return KeyRing.of(keys)


# Minting and verifying


def _new_token_id() -> str:
    # One starting with "-" would read as an option in `burrow token revoke ID`.
    while True:
        token_id = secrets.token_urlsafe(TOKEN_ID_BYTES)
        if not token_id.startswith("-"):
            return token_id


def mint(
    key: Ed25519PrivateKey,
    *,
    subject: str,
    ttl_seconds: int | None,
    max_tunnels: int | None = None,
    now: float | None = None,
    not_before: int | None = None,
    relays: Sequence[str] | None = None,
) -> str:
    """A token for ``subject``, valid for ``ttl_seconds`` from ``now`` (None: forever).

    ``not_before`` delays its start; ``relays`` (their domains) limits it to those relays.
    """
    if not subject or len(subject) > MAX_SUBJECT_LENGTH:
        raise InvalidError(f"token subject must be 1 to {MAX_SUBJECT_LENGTH} characters")
    if ttl_seconds is not None and not 0 < ttl_seconds <= MAX_TTL_SECONDS:
        raise InvalidError(
            f"token lifetime must be from 1 to {MAX_TTL_SECONDS} seconds, or None for never"
        )
    if max_tunnels is not None and max_tunnels < 1:
        raise InvalidError("max_tunnels must be at least 1, or None for no limit")
    if not_before is not None and not 0 <= not_before <= MAX_TIMESTAMP:
        raise InvalidError("not_before must be a time in seconds since the epoch")
    audience = _relay_names(relays) if relays is not None else None
    issued_at = int(time.time() if now is None else now)
    payload: dict[str, Any] = {
        "iss": TOKEN_ISSUER,
        "sub": subject,
        "iat": issued_at,
        "jti": _new_token_id(),
    }
    if ttl_seconds is not None:
        payload["exp"] = issued_at + ttl_seconds
    if max_tunnels is not None:
        payload["max_tunnels"] = max_tunnels
    if not_before is not None:
        payload["nbf"] = not_before
    if audience is not None:
        payload["aud"] = list(audience)
    # The kid tells a relay holding several keys (a rotation) which one to check.
    return jwt.encode(payload, key, algorithm=TOKEN_ALGORITHM, headers={"kid": key_id(key)})


def _relay_names(relays: Sequence[str]) -> tuple[str, ...]:
    if isinstance(relays, str) or not 0 < len(relays) <= MAX_TOKEN_RELAYS:
        raise InvalidError(f"a token names 1 to {MAX_TOKEN_RELAYS} relays, or None for every relay")
    return tuple(dict.fromkeys(names.normalize_domain(relay) for relay in relays))


def _header(token: str) -> dict[str, Any]:
    """The header of ``token``, unverified: for its ``kid`` and ``typ``."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise TokenError("malformed", f"token is malformed: {exc}") from None
    except (ValueError, TypeError, KeyError):
        raise TokenError("malformed", "token is malformed") from None
    if not isinstance(header, dict):
        raise TokenError("malformed", "token is malformed: its header is not a JSON object")
    return header


def _key_id_of(header: dict[str, Any], what: str) -> str | None:
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise TokenError("malformed", f"{what} is malformed: 'kid' is not a string")
    return kid


def _decode(token: str, keys: KeyRing) -> dict[str, Any]:
    """Check signature (with the key its ``kid`` names, or any) and issuer."""
    header = _header(token)
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or typ not in _TOKEN_TYPES):
        raise TokenError("malformed", f"token is malformed: it is a {str(typ)[:40]!r}")
    for key in keys.candidates(_key_id_of(header, "token"), "token"):
        try:
            return _decode_with(token, key)
        except TokenError as exc:
            if exc.reason != "bad-signature":
                raise
    raise TokenError("bad-signature", "token signature is not valid")


def _decode_with(token: str, public_key: Ed25519PublicKey) -> dict[str, Any]:
    """Check signature and issuer; PyJWT's errors become TokenError."""
    try:
        payload: dict[str, Any] = jwt.decode(
            token,
            public_key,
            algorithms=[TOKEN_ALGORITHM],
            issuer=TOKEN_ISSUER,
            # Times are checked by the caller, against its own `now`.
            options={
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
                "verify_aud": False,  # checked by verify, against the relay's own domain
                "require": ["iss", "sub", "iat", "jti"],
            },
        )
    except (jwt.InvalidSignatureError, jwt.InvalidAlgorithmError):
        raise TokenError("bad-signature", "token signature is not valid") from None
    except jwt.PyJWTError as exc:
        raise TokenError("malformed", f"token is malformed: {exc}") from None
    except (ValueError, TypeError, KeyError):
        # A third-party parser fed bytes from anyone: whatever else it
        # raises, the input was still garbage.
        raise TokenError("malformed", "token is malformed") from None
    return payload


def _timestamp(payload: dict[str, Any], name: str) -> int:
    value = payload[name]
    if type(value) is not int or not 0 <= value <= MAX_TIMESTAMP:
        raise TokenError("malformed", f"token is malformed: {name!r} is not a timestamp")
    return value


def _grant(payload: dict[str, Any]) -> TokenGrant:
    subject, token_id = payload["sub"], payload["jti"]
    if not isinstance(subject, str) or not isinstance(token_id, str):
        raise TokenError("malformed", "token is malformed: 'sub' and 'jti' must be strings")
    max_tunnels = payload.get("max_tunnels")
    # `type(...) is int` rather than isinstance: JSON true must not count as 1.
    if max_tunnels is not None and (type(max_tunnels) is not int or max_tunnels < 0):
        raise TokenError("malformed", "token is malformed: 'max_tunnels' is not a count")
    return TokenGrant(
        subject=subject,
        token_id=token_id,
        issued_at=_timestamp(payload, "iat"),
        expires_at=_timestamp(payload, "exp") if "exp" in payload else None,
        max_tunnels=max_tunnels,
        not_before=_timestamp(payload, "nbf") if "nbf" in payload else None,
        relays=_audience(payload["aud"]) if "aud" in payload else None,
    )


def _audience(value: object) -> tuple[str, ...]:
    """The relays of a token's ``aud``: one domain, or a list of them (RFC 7519 §4.1.3)."""
    relays = [value] if isinstance(value, str) else value
    if (
        not isinstance(relays, list)
        or not 0 < len(relays) <= MAX_TOKEN_RELAYS
        or not all(isinstance(relay, str) for relay in relays)
    ):
        raise TokenError("malformed", "token is malformed: 'aud' is not a list of relays")
    try:
        return _relay_names(relays)
    except InvalidError:
        raise TokenError("malformed", "token is malformed: 'aud' is not a list of relays") from None


def check_time(
    grant: TokenGrant, *, now: float, leeway_seconds: int = DEFAULT_LEEWAY_SECONDS
) -> TokenError | None:
    """Why ``grant`` is not valid at ``now`` (too early or expired), or None if it is.

    A relay asks at ``hello`` (through :func:`verify`) and again for as long
    as a session lives: on each ``open`` and in its periodic sweep.
    """
    if grant.issued_at > now + leeway_seconds:
        return TokenError(
            "not-yet-valid", f"token is not valid yet: issued at {_utc(grant.issued_at)}"
        )
    if grant.not_before is not None and grant.not_before > now + leeway_seconds:
        return TokenError(
            "not-yet-valid", f"token is not valid yet: not before {_utc(grant.not_before)}"
        )
    if grant.expires_at is not None and grant.expires_at <= now - leeway_seconds:
        return TokenError("expired", f"token expired at {_utc(grant.expires_at)}")
    return None


def verify(
    token: str,
    public_key: Ed25519PublicKey | KeyRing,
    *,
    now: float | None = None,
    leeway_seconds: int = DEFAULT_LEEWAY_SECONDS,
    revoked: Container[str] = frozenset(),
    relay: str | None = None,
) -> TokenGrant:
    """What ``token`` grants if ``public_key`` (or, for a ring, the key its
    ``kid`` names, or any key when it has none) signed it and it is valid at ``now``.

    A token whose id is in ``revoked`` is refused too, and so is one that
    names its relays when ``relay`` (the checking relay's normalised domain)
    is not among them. Raises TokenError for every way a token can be bad,
    whatever the input.
    """
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        raise TokenError("malformed", "token is malformed: not a string of a sane length")
    if _TOKEN_RE.fullmatch(token) is None:
        raise TokenError("malformed", "token is malformed: not three base64url segments")
    grant = _grant(_decode(token, _ring(public_key)))
    # After the signature: only a token we issued can be "revoked"; a forgery
    # that copies a revoked id is still just a forgery.
    if grant.token_id in revoked:
        raise TokenError("revoked", f"token {grant.token_id} was revoked")
    refusal = check_time(
        grant, now=time.time() if now is None else now, leeway_seconds=leeway_seconds
    )
    if refusal is not None:
        raise refusal
    if relay is not None and grant.relays is not None and relay not in grant.relays:
        raise TokenError("wrong-relay", f"token is for {', '.join(grant.relays)} only, not {relay}")
    return grant


def parse_duration(text: str) -> int | None:
    """Seconds in ``30d``, ``12h``, ``15m``, ``90s`` or ``1w``; None for ``never``."""
    folded = text.strip().lower()
    if folded == _NEVER:
        return None
    match = _DURATION_RE.fullmatch(folded)
    if match is None:
        raise InvalidError(
            f"invalid duration {text!r}: expected a number and a unit "
            "(s, m, h, d or w, e.g. 30d) or 'never'"
        )
    seconds = int(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not 0 < seconds <= MAX_TTL_SECONDS:
        raise InvalidError(
            f"invalid duration {text!r}: must be more than 0 and at most 100 years; "
            "use 'never' for a token that does not expire"
        )
    return seconds


# Revocation: a text file of token ids that relays refuse


def _unverified_payload(token: str) -> dict[str, Any]:
    token = token.strip()
    if len(token) > MAX_TOKEN_LENGTH or _TOKEN_RE.fullmatch(token) is None:
        raise InvalidError("not a burrow token: expected three base64url segments")
    try:
        payload = jwt.decode(token, options={"verify_signature": False})
    except (jwt.PyJWTError, ValueError, TypeError, KeyError):
        raise InvalidError("not a burrow token: its payload cannot be read") from None
    if not isinstance(payload, dict):
        raise InvalidError("not a burrow token: its payload is not a JSON object")
    return payload


def token_id_of(token: str) -> str:
    """The id (``jti``) of ``token``, read without checking its signature.

    For revoking: whoever holds a token may revoke it, and the id is all a
    relay compares, so no key is needed.
    """
    token_id = _unverified_payload(token).get("jti")
    if not isinstance(token_id, str) or not token_id:
        raise InvalidError("the token has no id ('jti'), so it cannot be revoked")
    return token_id


def unverified_subject(token: str) -> str | None:
    """The subject of ``token``, unverified and made safe to print on one line."""
    subject = _unverified_payload(token).get("sub")
    if not isinstance(subject, str):
        return None
    # Anyone can write a token's payload: no line breaks or control characters
    # may reach a file or a terminal.
    return "".join(c if c.isprintable() else "?" for c in subject)[:MAX_NOTE_LENGTH]


def parse_revocation_list(text: str) -> frozenset[str]:
    """The token ids in a revocation list: one a line; ``#`` starts a comment."""
    ids = set()
    for line in text.splitlines():
        token_id = line.partition("#")[0].strip()
        if token_id:
            ids.add(token_id)
    return frozenset(ids)


def _check_listable(token_id: str) -> None:
    if not token_id or any(c.isspace() or c == "#" for c in token_id):
        raise InvalidError(
            f"{token_id!r} is not a token id: a revocation list holds ids without "
            "spaces or '#', one a line"
        )


def append_revocation(path: Path, token_id: str, note: str = "") -> bool:
    """Add ``token_id`` to the revocation list at ``path`` (made 0644 if new).

    False if it was already listed. ``note`` goes in a comment on the same line.
    """
    _check_listable(token_id)
    try:
        existing = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        existing = ""
    except OSError as exc:
        raise InvalidError(f"cannot read revocation list {path}: {exc.strerror}") from exc
    if token_id in parse_revocation_list(existing):
        return False
    note = "".join(c if c.isprintable() else "?" for c in note)  # one line, always
    line = f"{token_id}  # {note}\n" if note else f"{token_id}\n"
    if existing and not existing.endswith("\n"):
        line = "\n" + line
    try:
        # O_APPEND: a relay reading the file meanwhile sees whole lines or none of ours.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
            os.fchmod(fd, 0o644)  # whatever the umask: the relay's user must read it
        except FileExistsError:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        with os.fdopen(fd, "a", encoding="utf-8") as file:
            file.write(line)
    except OSError as exc:
        raise InvalidError(f"cannot write revocation list {path}: {exc.strerror}") from exc
    return True
