"""Tests for burrow.relay.certs and burrow.relay.claimsecret: certificate checks, the
watched files, and the claim secret that outlives a TLS key. Files, no sockets."""

from __future__ import annotations

import logging
import os
import ssl
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from leaves import new_leaf

from burrow.exception import InvalidError
from burrow.net import devca
from burrow.relay import certs, claimsecret
from burrow.relay.certs import Certificate, CertificateError, CertificateFiles, check_pair
from burrow.relay.claims import ClaimSigner

DOMAIN = "r1.localhost"
NOW = datetime.now(UTC)


@pytest.fixture
def pair(tmp_path: Path) -> devca.DevCertificates:
    # Made at NOW, the time the checks below use: however long after the module
    # was imported this test runs, the certificate is already valid then.
    return devca.ensure_dev_certificates(tmp_path / "ca", DOMAIN, now=NOW)


def pems(p: devca.DevCertificates) -> tuple[bytes, bytes]:
    return p.cert.read_bytes(), p.key.read_bytes()


def no_sni(ssl_object: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> int | None:
    return None


# -- the checks, on bytes --------------------------------------------------------------


def test_a_good_pair_passes_and_says_what_it_is(pair: devca.DevCertificates) -> None:
    cert = check_pair(*pems(pair), DOMAIN, NOW)
    assert cert.names == {DOMAIN, f"*.{DOMAIN}"}
    assert cert.not_before <= NOW < cert.not_after
    assert len(cert.fingerprint) == 64
    assert f"serial {cert.serial:x}" in cert.describe()


def test_a_key_of_another_certificate_is_refused(
    pair: devca.DevCertificates, tmp_path: Path
) -> None:
    other = new_leaf(tmp_path / "ca", tmp_path / "other", DOMAIN, now=NOW)
    with pytest.raises(CertificateError, match="the key does not match the certificate"):
        check_pair(pair.cert.read_bytes(), other.key.read_bytes(), DOMAIN, NOW)


def test_a_certificate_for_another_domain_is_refused(pair: devca.DevCertificates) -> None:
    with pytest.raises(
        CertificateError,
        match=r"does not cover r2\.localhost and \*\.r2\.localhost "
        r"\(it has \*\.r1\.localhost, r1\.localhost\)",
    ):
        check_pair(*pems(pair), "r2.localhost", NOW)


def test_expired_and_not_yet_valid_certificates_are_refused(tmp_path: Path) -> None:
    old = devca.ensure_dev_certificates(tmp_path / "old", DOMAIN, now=NOW - timedelta(days=800))
    with pytest.raises(CertificateError, match="it expired at"):
        check_pair(*pems(old), DOMAIN, NOW)
    early = devca.ensure_dev_certificates(tmp_path / "early", DOMAIN, now=NOW + timedelta(days=1))
    with pytest.raises(CertificateError, match="it is not valid before"):
        check_pair(*pems(early), DOMAIN, NOW)


@pytest.mark.parametrize(
    ("cert_pem", "key_pem", "message"),
    [
        (b"junk", None, "holds no PEM certificate"),
        (None, b"junk", "holds no unencrypted PEM private key"),
    ],
)
def test_files_that_are_not_pem_are_refused(
    pair: devca.DevCertificates, cert_pem: bytes | None, key_pem: bytes | None, message: str
) -> None:
    good_cert, good_key = pems(pair)
    with pytest.raises(CertificateError, match=message):
        check_pair(cert_pem or good_cert, key_pem or good_key, DOMAIN, NOW)


def test_what_a_certificate_covers() -> None:
    def covering(*names: str) -> Certificate:
        return Certificate(1, "00", frozenset(names), NOW - timedelta(1), NOW + timedelta(1))

    assert covering("r1.example.com", "*.r1.example.com").fault("r1.example.com", NOW) is None
    # A wildcard one level up covers the relay's own name, never its wildcard.
    parent = covering("*.example.com", "*.r1.example.com")
    assert parent.covers("r1.example.com") and parent.covers("*.r1.example.com")
    assert not covering("*.example.com").covers("*.r1.example.com")
    assert not covering("*.r1.example.com").covers("r1.example.com")
    assert not covering("*.r1.example.com").covers("a.b.r1.example.com")
    assert covering("r1.example.com").covers("R1.Example.COM.")


# -- contexts from files ---------------------------------------------------------------


def test_load_makes_the_three_contexts_and_checks_first(
    pair: devca.DevCertificates, tmp_path: Path
) -> None:
    contexts = certs.load(pair.cert, pair.key, DOMAIN, no_sni)
    assert contexts.agent.sni_callback is no_sni
    assert contexts.visitor.sni_callback is None and contexts.visitor_h2.sni_callback is None
    assert contexts.certificate == check_pair(*pems(pair), DOMAIN, NOW)
    with pytest.raises(CertificateError, match=f"certificate {pair.cert} with key .*r2"):
        certs.load(pair.cert, pair.key, "r2.localhost", no_sni)
    with pytest.raises(CertificateError, match="cannot read the private key"):
        certs.load(pair.cert, tmp_path / "missing.pem", DOMAIN, no_sni)


def test_a_relay_starting_with_a_stale_certificate_is_warned_not_stopped(
    pair: devca.DevCertificates, caplog: pytest.LogCaptureFixture
) -> None:
    contexts = certs.load(pair.cert, pair.key, "r2.localhost", no_sni, strict=False)
    assert contexts.certificate.names == {DOMAIN, f"*.{DOMAIN}"}
    assert "will not satisfy clients: it does not cover r2.localhost" in caplog.text


# -- the watched files -----------------------------------------------------------------


class Loads:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, cert: Path, key: Path) -> Certificate:
        self.count += 1
        return certs.load(cert, key, DOMAIN, no_sni).certificate


def replace_file(source: Path, target: Path) -> None:
    """As renewal tools do: a new file renamed over the old one."""
    temporary = target.with_suffix(".new")
    temporary.write_bytes(source.read_bytes())
    os.replace(temporary, target)


def test_unchanged_files_are_not_read_again(pair: devca.DevCertificates) -> None:
    loads = Loads()
    files = CertificateFiles(pair.cert, pair.key, loads)
    assert files.poll() is None and files.poll() is None
    assert loads.count == 0


def test_a_pair_replaced_one_file_at_a_time_is_taken_once_it_matches(
    pair: devca.DevCertificates, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    renewed = new_leaf(tmp_path / "ca", tmp_path / "renewed", DOMAIN, now=NOW)
    loads = Loads()
    files = CertificateFiles(pair.cert, pair.key, loads)
    replace_file(renewed.cert, pair.cert)
    assert files.poll() is None  # the old key: no match yet, and no complaint
    replace_file(renewed.key, pair.key)
    taken = files.poll()
    assert taken is not None and taken == check_pair(*pems(renewed), DOMAIN, NOW)
    assert files.poll() is None
    assert "refused" not in caplog.text


def test_a_bad_pair_is_logged_once_and_a_good_one_later_is_taken(
    pair: devca.DevCertificates, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "burrow.relay")
    foreign = devca.ensure_dev_certificates(tmp_path / "foreign", "r2.localhost", now=NOW)
    loads = Loads()
    files = CertificateFiles(pair.cert, pair.key, loads)
    replace_file(foreign.cert, pair.cert)
    replace_file(foreign.key, pair.key)
    for _ in range(5):
        assert files.poll() is None
    refusals = [r for r in caplog.records if "refused the changed certificate files" in r.message]
    assert len(refusals) == 1, caplog.text
    assert "does not cover r1.localhost and *.r1.localhost" in refusals[0].message
    assert loads.count == 2  # tried twice, then left alone until the files change
    renewed = new_leaf(tmp_path / "ca", tmp_path / "renewed", DOMAIN, now=NOW)
    replace_file(renewed.key, pair.key)
    replace_file(renewed.cert, pair.cert)
    assert files.poll() == check_pair(*pems(renewed), DOMAIN, NOW)


def test_follow_moves_the_watch_to_other_files(pair: devca.DevCertificates, tmp_path: Path) -> None:
    renewed = new_leaf(tmp_path / "ca", tmp_path / "renewed", DOMAIN, now=NOW)
    files = CertificateFiles(pair.cert, pair.key, Loads())
    files.follow(renewed.cert, renewed.key)
    assert files.poll() is None  # taken as loaded already
    replace_file(pair.cert, renewed.cert)
    replace_file(pair.key, renewed.key)
    assert files.poll() == check_pair(*pems(pair), DOMAIN, NOW)


# -- the claim secret ------------------------------------------------------------------


def test_the_derived_secret_signs_exactly_as_the_tls_key_did(
    pair: devca.DevCertificates,
) -> None:
    # Before the claim secret, claims were signed with the key file's bytes.
    before = ClaimSigner(pair.key.read_bytes())
    after = ClaimSigner(claimsecret.derive(pair.key.read_bytes()))
    for label, port in (("abcdefghijklmn", None), ("zyxwvutsrqponm", 20001)):
        assert after.sign(label, port, "tok1") == before.sign(label, port, "tok1")


def test_a_new_state_dir_gets_a_private_secret_derived_from_the_key(
    pair: devca.DevCertificates, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    secret = claimsecret.load_or_create(state, pair.key)
    assert secret == claimsecret.derive(pair.key.read_bytes())
    path = state / claimsecret.CLAIM_SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert path.read_text() == secret.hex() + "\n"
    # Once there, a new TLS key changes nothing.
    renewed = new_leaf(tmp_path / "ca", tmp_path / "renewed", DOMAIN, now=NOW)
    assert claimsecret.load_or_create(state, renewed.key) == secret


def test_without_a_key_yet_the_secret_is_random(tmp_path: Path) -> None:
    first = claimsecret.load_or_create(tmp_path / "a", tmp_path / "no-key.pem")
    second = claimsecret.load_or_create(tmp_path / "b", tmp_path / "no-key.pem")
    assert len(first) == claimsecret.CLAIM_SECRET_BYTES and first != second
    assert claimsecret.load_or_create(tmp_path / "a", tmp_path / "no-key.pem") == first


def test_without_a_state_dir_the_secret_is_derived_each_time(
    pair: devca.DevCertificates,
) -> None:
    assert claimsecret.load_or_create(None, pair.key) == claimsecret.derive(pair.key.read_bytes())


def test_a_damaged_secret_is_an_error_not_a_new_secret(
    pair: devca.DevCertificates, tmp_path: Path
) -> None:
    path = tmp_path / claimsecret.CLAIM_SECRET_FILE
    for damage in ("", "not hex\n", "abcd\n"):
        path.write_text(damage)
        with pytest.raises(InvalidError, match="is damaged: restore it from a backup"):
            claimsecret.load_or_create(tmp_path, pair.key)
    assert path.read_text() == "abcd\n"


def test_a_secret_others_can_read_is_warned_about(
    pair: devca.DevCertificates, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = claimsecret.load_or_create(tmp_path / "state", pair.key)
    path = tmp_path / "state" / claimsecret.CLAIM_SECRET_FILE
    path.chmod(0o644)
    assert claimsecret.load_or_create(tmp_path / "state", pair.key) == secret
    assert "can be read by others: chmod 600 it" in caplog.text
