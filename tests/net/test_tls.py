"""Tests for burrow.net.tls and burrow.net.devca: contexts, and the dev CA checked by curl and
by Python's ssl."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import stat
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from burrow.exception import InvalidError
from burrow.net import tls as tls_module
from burrow.net.devca import DevCertificates, ensure_dev_certificates
from burrow.net.tls import (
    _client_context,
    _Preload,
    client_context,
    offering,
    server_context,
    shared_client_context,
)

CURL = "/usr/bin/curl"
DOMAIN = "r1.localhost"
BODY = b"hello from burrow"


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def snapshot(state: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(state.iterdir())}


@pytest.fixture
def dev(tmp_path: Path) -> DevCertificates:
    return ensure_dev_certificates(tmp_path / "state", DOMAIN)


# The dev CA


def test_dev_certificates_layout(tmp_path: Path) -> None:
    state = tmp_path / "state"
    certs = ensure_dev_certificates(state, "R1.LOCALHOST.")
    assert certs == DevCertificates(
        ca_cert=state / "ca.pem", cert=state / "relay.pem", key=state / "relay-key.pem"
    )
    assert sorted(p.name for p in state.iterdir()) == [
        "ca-key.pem",
        "ca.pem",
        "relay-key.pem",
        "relay.pem",
    ]
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "ca-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "relay-key.pem").stat().st_mode) == 0o600


def test_dev_ca_certificate(dev: DevCertificates) -> None:
    ca = load(dev.ca_cert)
    (common_name,) = ca.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    assert isinstance(common_name.value, str)
    prefix, _, suffix = common_name.value.rpartition(" ")
    assert prefix == "burrow dev CA"
    assert len(suffix) == 6
    int(suffix, 16)
    assert ca.issuer == ca.subject
    public = ca.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical
    assert basic.value.ca
    assert basic.value.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert timedelta(days=3649) < lifetime < timedelta(days=3652)
    ca.verify_directly_issued_by(ca)


def test_dev_leaf_certificate(dev: DevCertificates) -> None:
    ca, leaf = load(dev.ca_cert), load(dev.cert)
    leaf.verify_directly_issued_by(ca)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [DOMAIN, f"*.{DOMAIN}"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert not usage.key_cert_sign
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime == timedelta(days=397)
    assert leaf.not_valid_before_utc < datetime.now(UTC) < leaf.not_valid_after_utc
    key = serialization.load_pem_private_key(dev.key.read_bytes(), password=None)
    assert key.public_key() == leaf.public_key()


def test_dev_certificates_are_reused(dev: DevCertificates) -> None:
    state = dev.ca_cert.parent
    before = snapshot(state)
    assert ensure_dev_certificates(state, DOMAIN) == dev
    assert snapshot(state) == before


def test_missing_leaf_is_reissued_with_the_same_ca(dev: DevCertificates) -> None:
    ca_before = dev.ca_cert.read_bytes()
    dev.cert.unlink()
    ensure_dev_certificates(dev.ca_cert.parent, DOMAIN)
    assert dev.ca_cert.read_bytes() == ca_before
    load(dev.cert).verify_directly_issued_by(load(dev.ca_cert))


def test_mismatched_leaf_key_is_reissued(dev: DevCertificates) -> None:
    old_leaf = dev.cert.read_bytes()
    other = ec.generate_private_key(ec.SECP256R1())
    dev.key.write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ensure_dev_certificates(dev.ca_cert.parent, DOMAIN)
    assert dev.cert.read_bytes() != old_leaf
    key = serialization.load_pem_private_key(dev.key.read_bytes(), password=None)
    assert key.public_key() == load(dev.cert).public_key()


def test_new_domain_reissues_the_leaf(dev: DevCertificates) -> None:
    ca_before = dev.ca_cert.read_bytes()
    ensure_dev_certificates(dev.ca_cert.parent, "r2.localhost")
    assert dev.ca_cert.read_bytes() == ca_before
    san = load(dev.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["r2.localhost", "*.r2.localhost"]


def test_expiring_leaf_is_reissued(tmp_path: Path) -> None:
    state = tmp_path / "state"
    long_ago = datetime.now(UTC) - timedelta(days=380)  # leaf has 17 days left
    ensure_dev_certificates(state, DOMAIN, now=long_ago)
    ca_before = (state / "ca.pem").read_bytes()
    old_expiry = load(state / "relay.pem").not_valid_after_utc
    ensure_dev_certificates(state, DOMAIN)
    assert (state / "ca.pem").read_bytes() == ca_before
    assert load(state / "relay.pem").not_valid_after_utc > old_expiry + timedelta(days=300)


def test_leaf_from_another_ca_is_reissued(tmp_path: Path) -> None:
    ours = ensure_dev_certificates(tmp_path / "a", DOMAIN)
    theirs = ensure_dev_certificates(tmp_path / "b", DOMAIN)
    shutil.copy(theirs.cert, ours.cert)
    shutil.copy(theirs.key, ours.key)
    ensure_dev_certificates(tmp_path / "a", DOMAIN)
    load(ours.cert).verify_directly_issued_by(load(ours.ca_cert))
    assert ours.cert.read_bytes() != theirs.cert.read_bytes()


@pytest.mark.parametrize("damage", ["delete-key", "garbage-cert", "swap-cert"])
def test_broken_ca_regenerates_everything(tmp_path: Path, damage: str) -> None:
    certs = ensure_dev_certificates(tmp_path / "state", DOMAIN)
    ca_key = certs.ca_cert.parent / "ca-key.pem"
    before = snapshot(certs.ca_cert.parent)
    if damage == "delete-key":
        ca_key.unlink()
    elif damage == "garbage-cert":
        certs.ca_cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nnope\n")
    else:
        # A certificate whose key is not ca-key.pem's.
        shutil.copy(ensure_dev_certificates(tmp_path / "other", DOMAIN).ca_cert, certs.ca_cert)
    ensure_dev_certificates(certs.ca_cert.parent, DOMAIN)
    after = snapshot(certs.ca_cert.parent)
    assert after["ca.pem"] != before["ca.pem"]
    assert after["relay.pem"] != before["relay.pem"]
    load(certs.cert).verify_directly_issued_by(load(certs.ca_cert))


def test_expiring_ca_regenerates_everything(tmp_path: Path) -> None:
    state = tmp_path / "state"
    almost_ten_years_ago = datetime.now(UTC) - timedelta(days=10 * 365 - 100)
    ensure_dev_certificates(state, DOMAIN, now=almost_ten_years_ago)
    before = snapshot(state)
    ensure_dev_certificates(state, DOMAIN)
    after = snapshot(state)
    assert after["ca.pem"] != before["ca.pem"]
    assert load(state / "ca.pem").not_valid_after_utc > datetime.now(UTC) + timedelta(days=3000)
    load(state / "relay.pem").verify_directly_issued_by(load(state / "ca.pem"))


def test_no_temporary_files_left_behind(dev: DevCertificates) -> None:
    dev.cert.unlink()
    ensure_dev_certificates(dev.ca_cert.parent, DOMAIN)
    assert not [p for p in dev.ca_cert.parent.iterdir() if p.name.startswith(".")]


def test_dev_certificates_reject_bad_domains(tmp_path: Path) -> None:
    with pytest.raises(InvalidError):
        ensure_dev_certificates(tmp_path, "not a domain")


# Contexts


def test_server_context_settings(dev: DevCertificates) -> None:
    context = server_context(dev.cert, dev.key, ["http/1.1"])
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert not context.check_hostname


def test_client_context_settings(dev: DevCertificates) -> None:
    context = client_context(dev.ca_cert, ["burrow/1"])
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert client_context(None, []).check_hostname


def test_server_context_names_the_bad_file(dev: DevCertificates, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not pem")
    for cert, key, named in [
        (missing, dev.key, missing),
        (dev.cert, missing, missing),
        (garbage, dev.key, garbage),
        (dev.cert, garbage, garbage),
        (dev.cert, dev.ca_cert.parent / "ca-key.pem", dev.cert),  # key of another cert
    ]:
        with pytest.raises(InvalidError, match=str(named)):
            server_context(cert, key, ["http/1.1"])


def test_client_context_names_the_bad_file(dev: DevCertificates, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not pem")
    for path in (missing, garbage, dev.key):
        with pytest.raises(InvalidError, match=str(path)):
            client_context(path, [])


# Real handshakes


@pytest.fixture
async def https_server(dev: DevCertificates) -> AsyncIterator[int]:
    """An HTTPS server on 127.0.0.1 answering every request with BODY; yields its port."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(BODY), BODY)
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    context = server_context(dev.cert, dev.key, ["http/1.1"])
    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def curl(*args: str) -> tuple[int, bytes, bytes]:
    process = await asyncio.create_subprocess_exec(
        CURL,
        "--silent",
        "--show-error",
        "--max-time",
        "20",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out, err


async def test_curl_trusts_the_dev_ca(dev: DevCertificates, https_server: int) -> None:
    code, out, err = await curl(
        "--cacert", str(dev.ca_cert), f"https://abc.{DOMAIN}:{https_server}/"
    )
    assert code == 0, err
    assert out == BODY


async def test_curl_without_the_dev_ca_refuses(https_server: int) -> None:
    code, out, _ = await curl(f"https://abc.{DOMAIN}:{https_server}/")
    assert code == 60  # CURLE_PEER_FAILED_VERIFICATION
    assert out == b""


async def test_curl_refuses_a_name_the_certificate_does_not_cover(
    dev: DevCertificates, https_server: int
) -> None:
    # A wildcard covers one label only.
    code, _, _ = await curl("--cacert", str(dev.ca_cert), f"https://a.b.{DOMAIN}:{https_server}/")
    assert code == 60


async def fetch(port: int, server_name: str, context: ssl.SSLContext) -> tuple[bytes, str | None]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=server_name
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        writer.write(f"GET / HTTP/1.1\r\nHost: {server_name}\r\n\r\n".encode())
        response = await reader.read()
    finally:
        writer.close()
    return response, ssl_object.selected_alpn_protocol()


async def test_python_client_trusts_the_dev_ca(dev: DevCertificates, https_server: int) -> None:
    context = client_context(dev.ca_cert, ["http/1.1"])
    for name in (f"abc.{DOMAIN}", DOMAIN):
        response, alpn = await fetch(https_server, name, context)
        assert response.startswith(b"HTTP/1.1 200 OK\r\n")
        assert response.endswith(BODY)
        assert alpn == "http/1.1"


@pytest.mark.parametrize("name", [f"a.b.{DOMAIN}", "abc.r2.localhost", "localhost"])
async def test_python_client_refuses_uncovered_names(
    dev: DevCertificates, https_server: int, name: str
) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        await fetch(https_server, name, client_context(dev.ca_cert, ["http/1.1"]))


async def test_python_client_without_the_dev_ca_refuses(https_server: int) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        await fetch(https_server, f"abc.{DOMAIN}", client_context(None, ["http/1.1"]))


async def test_python_client_with_another_dev_ca_refuses(tmp_path: Path, https_server: int) -> None:
    other = ensure_dev_certificates(tmp_path / "other", DOMAIN)
    with pytest.raises(ssl.SSLCertVerificationError):
        await fetch(https_server, f"abc.{DOMAIN}", client_context(other.ca_cert, ["http/1.1"]))


def test_unusable_state_dir_is_an_invalid_error(tmp_path: Path) -> None:
    # A file in the way fails even for root, unlike a read-only directory.
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    for state in (blocker, blocker / "state"):
        with pytest.raises(InvalidError, match=str(state)):
            ensure_dev_certificates(state, DOMAIN)


# Whom the client trusts: BURROW_CA alone, else the system's store


@pytest.fixture
def system_store(
    dev: DevCertificates, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Path]:
    """OpenSSL's default store pointed at a file of our own, which holds the dev CA."""
    store = tmp_path / "system-store.pem"
    store.write_bytes(dev.ca_cert.read_bytes())
    empty_dir = tmp_path / "system-store.d"
    empty_dir.mkdir()
    monkeypatch.setenv("SSL_CERT_FILE", str(store))
    monkeypatch.setenv("SSL_CERT_DIR", str(empty_dir))
    _client_context.cache_clear()  # contexts made before read another store
    yield store
    _client_context.cache_clear()


async def test_a_private_ca_replaces_the_system_store(
    dev: DevCertificates, system_store: Path, tmp_path: Path, https_server: int
) -> None:
    # The relay's CA is in the system store, but BURROW_CA names another:
    # only that one counts (pinning), so the relay is refused.
    other = ensure_dev_certificates(tmp_path / "other", DOMAIN)
    context = client_context(other.ca_cert, ["http/1.1"])
    assert context.cert_store_stats()["x509_ca"] == 1
    with pytest.raises(ssl.SSLCertVerificationError):
        await fetch(https_server, f"abc.{DOMAIN}", context)


async def test_without_a_ca_the_system_store_is_trusted(
    dev: DevCertificates, system_store: Path, https_server: int
) -> None:
    response, _ = await fetch(https_server, f"abc.{DOMAIN}", client_context(None, ["http/1.1"]))
    assert response.endswith(BODY)
    # ...and names are still checked.
    with pytest.raises(ssl.SSLCertVerificationError):
        await fetch(https_server, f"a.b.{DOMAIN}", client_context(None, ["http/1.1"]))


def _handshake(client: ssl.SSLObject, server: ssl.SSLObject, pipes: list[ssl.MemoryBIO]) -> None:
    client_in, client_out, server_in, server_out = pipes
    for _ in range(10):
        for end in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                end.do_handshake()
        server_in.write(client_out.read())
        client_in.write(server_out.read())


def test_one_shared_context_gives_each_connection_its_own_alpn(dev: DevCertificates) -> None:
    server_ctx = server_context(dev.cert, dev.key, ["burrow-data/1", "burrow/1"])
    shared = shared_client_context(dev.ca_cert)
    assert shared is shared_client_context(dev.ca_cert)
    assert shared is not client_context(dev.ca_cert, [])
    made = []
    for alpn in ("burrow/1", "burrow-data/1", "burrow/1"):
        pipes = [ssl.MemoryBIO() for _ in range(4)]
        with offering(shared, [alpn]) as context:
            client = context.wrap_bio(pipes[0], pipes[1], server_hostname=DOMAIN)
        server = server_ctx.wrap_bio(pipes[2], pipes[3], server_side=True)
        made.append((alpn, client, server, pipes))
    # Handshakes after the context's ALPN moved on: each keeps the one it was made with.
    for alpn, client, server, pipes in made:
        _handshake(client, server, pipes)
        assert client.selected_alpn_protocol() == alpn
        assert server.selected_alpn_protocol() == alpn


def test_a_preloaded_system_store_is_the_same_store(
    dev: DevCertificates, system_store: Path
) -> None:
    preload = _Preload()
    assert preload.take() is None  # nothing started, nothing to wait for
    preload.start(1)
    preloaded = preload.take()
    assert preloaded is not None
    assert preload.take() is None
    assert preloaded.cert_store_stats() == ssl.create_default_context().cert_store_stats()
    assert preloaded.cert_store_stats()["x509_ca"] == 1
    # client_context() takes a preloaded store and still checks names and certificates.
    tls_module._preloaded.start(1)
    context = client_context(None, ["http/1.1"])
    assert context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.cert_store_stats()["x509_ca"] == 1


def test_a_preloaded_pinned_context_is_the_one_the_agent_gets(
    dev: DevCertificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tls_module, "_preloaded", _Preload())
    _client_context.cache_clear()
    tls_module.preload_pinned_trust(dev.ca_cert)
    tls_module._preloaded.wait()
    made = _client_context.cache_info()
    assert made.currsize == 1  # made on the preload's thread
    context = shared_client_context(dev.ca_cert)
    assert _client_context.cache_info().hits == made.hits + 1
    # Pinned exactly as when made on the spot: that CA only, names checked.
    assert context.cert_store_stats()["x509_ca"] == 1
    assert context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED
    _client_context.cache_clear()
