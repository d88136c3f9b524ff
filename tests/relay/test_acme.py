"""relay/acme.py without a CA: when to renew, retry and complain; what a restart reuses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from burrow.net import devca
from burrow.relay import acme
from burrow.relay.acme import Certificate, Schedule
from burrow.relay.certs import CertificateError

DAY = 86400.0
# A Let's Encrypt certificate today: 90 days.
CERT = Certificate(pem=b"", not_before=1_000_000.0, not_after=1_000_000.0 + 90 * DAY)


def fixed(value: float) -> Callable[[], float]:
    """A "random" source that always says ``value``."""
    return lambda: value


def test_without_a_window_renewal_is_at_two_thirds_of_the_lifetime() -> None:
    assert acme.renewal_time(CERT, None, fixed(0.9)) == CERT.not_before + 60 * DAY


def test_a_renewal_window_from_the_ca_wins_and_a_random_point_of_it_is_taken() -> None:
    window = (CERT.not_before + 10 * DAY, CERT.not_before + 12 * DAY)
    assert acme.renewal_time(CERT, window, fixed(0.0)) == window[0]
    assert acme.renewal_time(CERT, window, fixed(0.5)) == CERT.not_before + 11 * DAY
    assert acme.renewal_time(CERT, window, fixed(1.0)) == window[1]
    # A window that ends before it starts is no window.
    assert acme.renewal_time(CERT, (window[1], window[0]), fixed(0.5)) == (
        CERT.not_before + 60 * DAY
    )


def test_retries_double_up_to_the_cap_with_jitter_down_to_half() -> None:
    full = [acme.retry_delay(n, fixed(1.0), 90 * DAY) for n in range(1, 10)]
    assert full[:4] == [60.0, 120.0, 240.0, 480.0]
    assert max(full) == acme.RETRY_MAX
    assert acme.retry_delay(3, fixed(0.0), 90 * DAY) == 120.0  # half of 240
    assert acme.retry_delay(3, fixed(0.5), 90 * DAY) == 180.0


def test_a_short_lived_certificate_caps_retries_at_a_twelfth_of_its_life() -> None:
    assert acme.retry_delay(20, fixed(1.0), 120.0, first=1.0) == 10.0
    # ...but never below the first delay.
    assert acme.retry_delay(20, fixed(1.0), 120.0, first=30.0) == 30.0


def test_schedule_retries_after_a_failure_and_resets_with_a_new_certificate() -> None:
    schedule = Schedule.for_certificate(CERT, None, fixed(1.0))
    renew_at = CERT.not_before + 60 * DAY
    assert schedule.next_try == renew_at
    assert not schedule.due(renew_at - 1)
    assert schedule.due(renew_at)
    assert schedule.failed(renew_at, fixed(1.0)) == 60.0
    assert schedule.next_try == renew_at + 60.0
    assert schedule.failed(renew_at + 60.0, fixed(0.0)) == 60.0  # 120 jittered to half
    assert schedule.failures == 2


def test_warning_at_a_third_left_and_error_at_a_sixth_each_once() -> None:
    schedule = Schedule.for_certificate(CERT, None, fixed(0.5))
    third = CERT.not_after - 30 * DAY
    sixth = CERT.not_after - 15 * DAY
    assert schedule.alarm(third - 1) is None
    assert schedule.alarm(third) == logging.WARNING
    assert schedule.alarm(third + 1) is None  # said once
    assert schedule.next_wake() == min(schedule.next_try, sixth)
    assert schedule.alarm(sixth) == logging.ERROR
    assert schedule.alarm(sixth + DAY) is None
    # A relay that starts late, past both, says the loud one at once.
    late = Schedule.for_certificate(CERT, None, fixed(0.5))
    assert late.alarm(sixth + DAY) == logging.ERROR
    assert late.alarm(sixth + 2 * DAY) is None


def test_the_warnings_wake_the_loop_even_while_retries_wait() -> None:
    schedule = Schedule.for_certificate(CERT, None, fixed(0.5), retry_first=40 * DAY)
    schedule.failed(CERT.not_before + 60 * DAY, fixed(1.0))
    assert schedule.next_wake() == CERT.not_after - 30 * DAY


def test_a_stored_certificate_is_reused_while_over_a_third_of_its_life_is_left() -> None:
    assert acme.reusable(CERT, CERT.not_before + 1)
    assert acme.reusable(CERT, CERT.not_before + 59 * DAY)
    assert not acme.reusable(CERT, CERT.not_before + 60 * DAY)
    assert not acme.reusable(CERT, CERT.not_after + 1)
    assert not acme.reusable(CERT, CERT.not_before - 1)  # not valid yet: our clock or its


def _store(settings: acme.AcmeSettings, domain: str, now: datetime) -> None:
    """A certificate from the dev CA standing in for a stored ACME one."""
    certs = devca.ensure_dev_certificates(settings.state_dir / "dev", domain, now=now)
    settings.dir.mkdir(parents=True, exist_ok=True)
    settings.cert.write_bytes(certs.cert.read_bytes())
    settings.key.write_bytes(certs.key.read_bytes())


def test_load_stored_checks_the_pair_and_both_names(tmp_path: Path) -> None:
    settings = acme.AcmeSettings(domain="r1.example.com", state_dir=tmp_path)
    assert acme.load_stored(settings) is None
    now = datetime.now(UTC)
    _store(settings, "r1.example.com", now)
    stored = acme.load_stored(settings)
    assert stored is not None
    assert stored.not_before == pytest.approx((now - devca.CLOCK_SKEW).timestamp(), abs=1)
    assert acme.reusable(stored, now.timestamp())
    assert not acme.reusable(stored, (now + timedelta(days=300)).timestamp())

    other = acme.AcmeSettings(domain="r2.example.com", state_dir=tmp_path)
    assert acme.load_stored(other) is None  # another domain's certificate

    settings.key.write_bytes(devca._key_pem(devca._new_ca(now)[1]))
    assert acme.load_stored(settings) is None  # a key that is not the certificate's


def test_ari_certificate_id_is_key_id_dot_serial(tmp_path: Path) -> None:
    # RFC 9773 section 4.1's example certificate id shape: base64url, no padding.
    certs = devca.ensure_dev_certificates(tmp_path, "r1.example.com")
    cert_id = acme._ari_cert_id(certs.cert.read_bytes())
    assert cert_id is not None
    key_id, serial = cert_id.split(".")
    assert "=" not in cert_id and key_id and serial


# -- the renewal loop, with a CA that answers at once ---------------------------------


LIFE = 24.0


class InstantCa:
    """Stands in for :class:`~burrow.relay.acme.AcmeClient`: every order succeeds at
    once with a certificate that starts ``now``."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock

    def begin_order(self) -> tuple[None, list[str], bytes]:
        return None, [], b""

    def finish_order(self, order: None, key_pem: bytes) -> Certificate:
        now = self.clock()
        return Certificate(pem=b"", not_before=now, not_after=now + LIFE)

    def renewal_window(self, cert: Certificate) -> None:
        return None


class NoSink:
    def set_challenge(self, values: list[str]) -> None:
        raise AssertionError("no challenge to publish")

    def clear_challenge(self) -> None:
        raise AssertionError("no challenge to clear")


def _manager(tmp_path: Path, clock: Callable[[], float]) -> acme.CertificateManager:
    settings = acme.AcmeSettings(domain="r1.example", state_dir=tmp_path, retry_first=0.01)
    manager = acme.CertificateManager(settings, NoSink(), clock=clock, random=fixed(1.0))
    manager.client = InstantCa(clock)  # type: ignore[assignment]
    # Due now: two thirds of its life gone, which is also a third left.
    now = clock()
    manager.current = Certificate(pem=b"", not_before=now - 2 * LIFE / 3, not_after=now + LIFE / 3)
    return manager


async def _renew_until(manager: acme.CertificateManager, installs: int, refuse: int = 0) -> None:
    """Run the renewal loop until ``installs`` certificates were installed, the first
    ``refuse`` of them refused as a relay refuses a bad pair."""
    done = asyncio.Event()
    seen: list[Certificate] = []

    def installed(cert: Certificate) -> None:
        seen.append(cert)
        if len(seen) <= refuse:
            raise CertificateError("it is not valid before ...")
        if len(seen) == installs + refuse:
            done.set()

    task = asyncio.create_task(manager.run(installed))
    try:
        async with asyncio.timeout(10):
            await done.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_renewal_on_time_gives_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "burrow.relay.acme")
    manager = _manager(tmp_path, time.time)
    await _renew_until(manager, installs=1)
    assert manager.orders == 1
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_certificate_the_relay_refuses_is_a_failed_renewal_tried_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "burrow.relay.acme")
    manager = _manager(tmp_path, time.time)
    await _renew_until(manager, installs=1, refuse=1)
    assert manager.orders == 2
    failed = [r.getMessage() for r in caplog.records if "renewing the certificate" in r.msg]
    assert len(failed) == 1 and "it is not valid before" in failed[0]
    # The failed try is what the warning at a third left reports.
    assert "has not been renewed (1 failed tries)" in caplog.text


# -- CAA bound to the account (RFC 8657) ------------------------------------------------


class Account:
    """Stands in for the client's account at a CA whose directory lists ``identities``."""

    def __init__(self, identities: tuple[str, ...]) -> None:
        self.identities = identities
        self.asked = 0

    def account(self) -> tuple[str, tuple[str, ...]]:
        self.asked += 1
        return "https://ca.example/acme/acct/42", self.identities


class CaaRecord:
    def __init__(self) -> None:
        self.value: tuple[str | None, str | None] | None = None

    def set_caa(self, issuer: str | None, account_uri: str | None = None) -> None:
        self.value = (issuer, account_uri)


@pytest.mark.parametrize(
    ("operator", "identities", "issuer"),
    [
        ("letsencrypt.org", (), "letsencrypt.org"),  # the directory names none
        ("letsencrypt.org", ("letsencrypt.org",), "letsencrypt.org"),
        ("b.example", ("a.example", "b.example"), "b.example"),  # the operator's, listed
        ("typo.example", ("letsencrypt.org",), "letsencrypt.org"),  # what the CA checks
    ],
)
async def test_caa_names_the_ca_and_the_account(
    tmp_path: Path, operator: str, identities: tuple[str, ...], issuer: str
) -> None:
    settings = acme.AcmeSettings(domain="r1.example", state_dir=tmp_path, caa=operator)
    record = CaaRecord()
    manager = acme.CertificateManager(settings, NoSink(), caa=record)
    manager.client = Account(identities)  # type: ignore[assignment]
    await manager.bind_caa()
    await manager.bind_caa()
    assert record.value == (issuer, "https://ca.example/acme/acct/42")
    assert manager.client.asked == 1  # type: ignore[attr-defined]  # once per manager


async def test_without_dns_caa_caa_is_left_alone(tmp_path: Path) -> None:
    settings = acme.AcmeSettings(domain="r1.example", state_dir=tmp_path)
    record = CaaRecord()
    manager = acme.CertificateManager(settings, NoSink(), caa=record)
    manager.client = Account(("letsencrypt.org",))  # type: ignore[assignment]
    await manager.bind_caa()
    assert record.value is None and manager.client.asked == 0  # type: ignore[attr-defined]
