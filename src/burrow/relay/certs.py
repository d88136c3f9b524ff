"""The relay's certificate: checked, made into TLS contexts, and swapped in one step.

:func:`check_pair` (pure: PEM bytes and a time in) says whether a certificate
and key may serve ``<domain>`` and ``*.<domain>``; :func:`load` makes the
relay's three TLS contexts from files that pass; :class:`CertificateFiles`
notices when the ``--cert``/``--key`` files are replaced. The relay holds one
:class:`TlsContexts` and replaces it whole (``Relay.use_certificate``):
connections in flight keep the contexts they were made with, new handshakes
get the new certificate. Only the relay imports this module (``cryptography``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Generic, TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from burrow.exception import InvalidError
from burrow.net import tls
from burrow.wire import protocol

log = logging.getLogger("burrow.relay")

ALPN_AGENT: Final = (protocol.ALPN_CONTROL, protocol.ALPN_DATA)
ALPN_VISITOR: Final = ("http/1.1",)
ALPN_VISITOR_H2: Final = ("h2", "http/1.1")

# How often the relay looks at its --cert and --key files. A look is two
# stat() calls; a renewed certificate is in use within a few seconds, long
# before the old one expires.
CERT_CHECK_SECONDS: Final = 2.0

SniCallback = Callable[[ssl.SSLObject, str | None, ssl.SSLContext], int | None]


class CertificateError(InvalidError):
    """A certificate and key the relay will not serve; the message says why."""


@dataclass(frozen=True)
class Certificate:
    """What the relay knows of a certificate it checked: enough to log and compare."""

    serial: int
    fingerprint: str
    """SHA-256 of the leaf certificate's DER, in hex: what a client sees."""
    names: frozenset[str]
    """The DNS names of its subjectAltName, lower case."""
    not_before: datetime
    not_after: datetime

    def covers(self, name: str) -> bool:
        """Whether a client checking ``name`` (itself maybe ``*.<domain>``) accepts it."""
        name = name.lower().rstrip(".")
        if name in self.names:
            return True
        first, _, rest = name.partition(".")
        return first != "*" and bool(rest) and f"*.{rest}" in self.names

    def fault(self, domain: str, now: datetime) -> str | None:
        """Why this certificate cannot serve ``domain`` at ``now``, or None if it can."""
        missing = [name for name in (domain, f"*.{domain}") if not self.covers(name)]
        if missing:
            have = ", ".join(sorted(self.names)) or "no DNS names"
            return f"it does not cover {' and '.join(missing)} (it has {have})"
        if now < self.not_before:
            return f"it is not valid before {self.not_before:%Y-%m-%d %H:%M:%S} UTC"
        if now >= self.not_after:
            return f"it expired at {self.not_after:%Y-%m-%d %H:%M:%S} UTC"
        return None

    def describe(self) -> str:
        return (
            f"serial {self.serial:x}, sha256 {self.fingerprint[:16]}, "
            f"valid until {self.not_after:%Y-%m-%d %H:%M:%S} UTC"
        )


def read_pair(cert_pem: bytes, key_pem: bytes) -> Certificate:
    """The leaf of ``cert_pem`` (a PEM chain, leaf first) if ``key_pem`` is its private key.

    Raises :class:`CertificateError` for anything that is not an unencrypted
    PEM key and a PEM certificate whose public key is the key's own.
    """
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise CertificateError("the certificate file holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CertificateError("the key file holds no unencrypted PEM private key") from None
    leaf = chain[0]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if key.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(der, spki):
        raise CertificateError("the key does not match the certificate")
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        dns_names = san.value.get_values_for_type(x509.DNSName)
    except (x509.ExtensionNotFound, ValueError):
        dns_names = []
    return Certificate(
        serial=leaf.serial_number,
        fingerprint=hashlib.sha256(leaf.public_bytes(der)).hexdigest(),
        names=frozenset(name.lower().rstrip(".") for name in dns_names),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
    )


def check_pair(cert_pem: bytes, key_pem: bytes, domain: str, now: datetime) -> Certificate:
    """:func:`read_pair`, and the certificate must serve ``domain`` and ``*.domain`` at ``now``."""
    certificate = read_pair(cert_pem, key_pem)
    fault = certificate.fault(domain, now)
    if fault is not None:
        raise CertificateError(fault)
    return certificate


@dataclass(frozen=True)
class TlsContexts:
    """The relay's TLS contexts, all made from one certificate and key."""

    agent: ssl.SSLContext
    """Every public connection starts here: the burrow ALPN ids and the SNI callback."""
    visitor: ssl.SSLContext
    """A tunnel's visitors: ``http/1.1``."""
    visitor_h2: ssl.SSLContext
    """An HTTP/2 tunnel's visitors: ``h2`` and ``http/1.1``."""
    certificate: Certificate
    cert: Path
    key: Path


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"cannot read the {what} {path}: {exc.strerror}") from exc


def _context(cert: Path, key: Path, alpn: Sequence[str]) -> ssl.SSLContext:
    try:
        return tls.openssl_server_context(cert, key, alpn)
    except (ssl.SSLError, OSError) as exc:
        raise CertificateError(f"OpenSSL cannot use it: {exc}") from exc


def load(
    cert: Path,
    key: Path,
    domain: str,
    sni_callback: SniCallback,
    *,
    strict: bool = True,
    now: datetime | None = None,
) -> TlsContexts:
    """The relay's contexts for ``cert`` and ``key``, checked first.

    A certificate that does not cover ``domain`` and ``*.domain`` or is not
    valid ``now`` is a :class:`CertificateError`; without ``strict`` (a
    relay's start, which served such certificates before) only a warning.
    Files that change while they are read are an error too: the caller tries
    again, rather than serve a pair that was never checked.
    """
    cert_pem, key_pem = _read(cert, "certificate"), _read(key, "private key")
    try:
        certificate = read_pair(cert_pem, key_pem)
        fault = certificate.fault(domain, now or datetime.now(UTC))
        if fault is not None:
            if strict:
                raise CertificateError(fault)
            log.warning("the certificate %s will not satisfy clients: %s", cert, fault)
        agent = _context(cert, key, ALPN_AGENT)
        visitor = _context(cert, key, ALPN_VISITOR)
        visitor_h2 = _context(cert, key, ALPN_VISITOR_H2)
    except CertificateError as exc:
        raise CertificateError(f"certificate {cert} with key {key}: {exc}") from exc
    if _read(cert, "certificate") != cert_pem or _read(key, "private key") != key_pem:
        raise CertificateError(f"certificate {cert} or key {key} changed while being read")
    agent.sni_callback = sni_callback
    return TlsContexts(agent, visitor, visitor_h2, certificate, cert, key)


# What tells a replaced file: its inode (renamed into place), size, mtime or
# ctime (rewritten in place); None for a file that cannot be looked at.
_Signature = tuple[tuple[int, int, int, int] | None, tuple[int, int, int, int] | None]

T = TypeVar("T")


def _stat(path: Path) -> tuple[int, int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


class CertificateFiles(Generic[T]):
    """A certificate and key file, loaded again with ``load`` when either is replaced.

    Tools that renew certificates write the two files one after the other,
    so a changed pair may not match yet: a pair that fails is tried again at
    each :meth:`poll`, and logged (once) only if it fails twice without
    changing in between. Only a pair that passes is returned.
    """

    def __init__(self, cert: Path, key: Path, load: Callable[[Path, Path], T]) -> None:
        self._load = load
        self.follow(cert, key)

    def follow(self, cert: Path, key: Path) -> None:
        """Watch these files from now on, taking them as they are now as already loaded."""
        self.cert, self.key = cert, key
        self._seen = self._signature()
        self._tried: _Signature | None = None
        self._refused: _Signature | None = None

    def _signature(self) -> _Signature:
        return (_stat(self.cert), _stat(self.key))

    def poll(self) -> T | None:
        """What ``load`` made of the files if they changed since they were last loaded."""
        before = self._signature()
        if before in (self._seen, self._refused):
            return None
        try:
            loaded = self._load(self.cert, self.key)
        except CertificateError as exc:
            if before == self._tried:
                self._refused = before
                log.warning(
                    "refused the changed certificate files, still serving the last good "
                    "certificate: %s",
                    exc,
                )
            self._tried = before
            return None
        if self._signature() != before:
            return None  # changed again while loaded: next time
        self._seen, self._tried, self._refused = before, None, None
        return loaded
