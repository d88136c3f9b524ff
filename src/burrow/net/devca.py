"""The private CA behind ``burrow dev``: a CA and a relay certificate in a state directory.

It lets a loopback relay serve real, verifiable TLS for ``<domain>`` and
``*.<domain>`` with no public certificate authority. Only the relay side and
tests need it: the client never imports this module (nor ``cryptography``).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from burrow.exception import InvalidError
from burrow.net.files import write_atomically
from burrow.wire.names import normalize_domain

# The dev CA outlives many relay restarts, so a user trusts it once.
CA_VALIDITY = timedelta(days=10 * 365)
# Browsers refuse leaf certificates valid for more than 398 days; one less
# leaves room for the backdating below.
LEAF_VALIDITY = timedelta(days=397)
# Re-issue the leaf a month before it expires, so a relay restarted now does
# not start failing mid-run.
LEAF_RENEW_BEFORE = timedelta(days=30)
# Replace the CA once it has less than a leaf's lifetime left: a leaf must
# never outlive the CA that signed it.
CA_RENEW_BEFORE = LEAF_VALIDITY + LEAF_RENEW_BEFORE
# Certificates start a little in the past so that a client whose clock runs
# slightly behind ours does not reject a brand-new certificate.
CLOCK_SKEW = timedelta(minutes=5)

CA_NAME_PREFIX = "burrow dev CA"
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
LEAF_CERT_FILE = "relay.pem"
LEAF_KEY_FILE = "relay-key.pem"

_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644
_STATE_DIR_MODE = 0o700


@dataclass(frozen=True)
class DevCertificates:
    """Where :func:`ensure_dev_certificates` keeps its files."""

    ca_cert: Path
    """The dev CA's certificate: give it to clients (curl --cacert, BURROW_CA)."""

    cert: Path
    """The relay's certificate for ``<domain>`` and ``*.<domain>``, signed by the CA."""

    key: Path
    """The private key of :attr:`cert`."""


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_pair(
    cert_path: Path, key_path: Path
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The certificate and its matching EC key, or None if either is missing or unusable."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        return None
    return cert, key


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    except (x509.ExtensionNotFound, ValueError):
        return False
    return constraints.value.ca


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _covers(cert: x509.Certificate, names: list[str]) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (x509.ExtensionNotFound, ValueError):
        return False
    return set(names) <= set(san.value.get_values_for_type(x509.DNSName))


def _new_ca(now: datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    # The random suffix tells apart the dev CAs of different machines in a
    # trust store listing.
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"{CA_NAME_PREFIX} {secrets.token_hex(3)}")]
    )
    not_before = now - CLOCK_SKEW
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _new_leaf(
    domain: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    not_before = now - CLOCK_SKEW
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, domain)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + LEAF_VALIDITY)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(domain), x509.DNSName(f"*.{domain}")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def ensure_dev_certificates(
    state_dir: Path, domain: str, *, now: datetime | None = None
) -> DevCertificates:
    """Make sure ``state_dir`` holds a dev CA and a relay certificate for ``domain``.

    Existing files are kept while they are good; the relay certificate is
    re-issued when missing, near expiry, for another domain or from another
    CA, and everything is replaced when the CA is missing or near expiry
    (clients then need the new ``ca.pem``). Concurrent calls on one
    directory are not coordinated. ``now`` (timezone-aware) is for tests.
    """
    domain = normalize_domain(domain)
    current = datetime.now(UTC) if now is None else now
    paths = DevCertificates(
        ca_cert=state_dir / CA_CERT_FILE,
        cert=state_dir / LEAF_CERT_FILE,
        key=state_dir / LEAF_KEY_FILE,
    )
    try:
        state_dir.mkdir(mode=_STATE_DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidError(f"cannot create state directory {state_dir}: {exc.strerror}") from exc

    ca = _load_pair(paths.ca_cert, state_dir / CA_KEY_FILE)
    if ca is None or not _is_ca(ca[0]) or ca[0].not_valid_after_utc - current < CA_RENEW_BEFORE:
        ca = _new_ca(current)
        # Key first: if we stop between the two writes, the pair no longer
        # matches and the next call starts over instead of using it.
        write_atomically(state_dir / CA_KEY_FILE, _key_pem(ca[1]), _PRIVATE_MODE)
        write_atomically(paths.ca_cert, _cert_pem(ca[0]), _PUBLIC_MODE)
    ca_cert, ca_key = ca

    leaf = _load_pair(paths.cert, paths.key)
    if (
        leaf is None
        or leaf[0].not_valid_after_utc - current < LEAF_RENEW_BEFORE
        or not _covers(leaf[0], [domain, f"*.{domain}"])
        or not _signed_by(leaf[0], ca_cert)
    ):
        cert, key = _new_leaf(domain, ca_cert, ca_key, current)
        write_atomically(paths.key, _key_pem(key), _PRIVATE_MODE)
        write_atomically(paths.cert, _cert_pem(cert), _PUBLIC_MODE)
    return paths
