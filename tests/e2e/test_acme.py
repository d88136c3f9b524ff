"""--auto-cert against a real ACME CA: pebble, Let's Encrypt's test server (tests/pebble.py).

pebble asks the relay's own DNS server (relay/dnsserver.py) for the DNS-01
TXT records, as a CA asks a delegated zone; the bad-input cases that need no
relay DNS use pebble-challtestsrv.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import itertools
import logging
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import dns.resolver
import pytest
from backends import free_port, http_server, wait_for_port
from devrelay import BURROW, clean_env, stop
from harness import wait_until
from pebble import Pebble, run_pebble, start_pebble

import burrow
from burrow import tokens
from burrow.agent.client import runtime
from burrow.agent.session import AgentSession
from burrow.net.loopthread import LoopThread
from burrow.relay import acme, dnsserver, process
from burrow.relay.config import RelayConfig
from burrow.relay.server import Relay

DOMAIN = "r1.localhost"  # curl and the agent keep *.localhost on loopback

# Renewals under load: pebble's certificates live this long, so the relay renews
# at two thirds of it, every 16 s, and renews twice within about 35 s.
SHORT_LIFE: Final = 24
# The renewals to see while the load runs, and a fresh TLS connection this often.
RENEWALS: Final = 2
FRESH_EVERY: Final = 1.0


@dataclass
class AcmeRelay:
    relay: Relay
    manager: acme.CertificateManager
    thread: LoopThread
    root: Path
    signing_key: object
    state_dir: Path
    renewals: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return f"{DOMAIN}:{self.relay.bound_port}"

    def client(self) -> burrow.Client:
        token = tokens.mint(self.signing_key, subject="acme", ttl_seconds=3600)
        return burrow.Client(relay=self.address, token=token, ca=str(self.root))

    def renew(self) -> None:
        """Start renewing, as a relay started with --auto-cert does."""

        async def start() -> None:
            self.renewals = process.keep_renewed(self.manager, self.relay)

        self.thread.run(start())

    def stop_renewing(self) -> None:
        async def stop() -> None:
            if self.renewals is not None:
                self.renewals.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.renewals

        self.thread.run(stop())

    def served(self, name: str | None = None) -> bytes:
        """The DER certificate a fresh handshake with SNI ``name`` gets."""
        context = ssl.create_default_context(cafile=str(self.root))
        with (
            socket.create_connection(("127.0.0.1", self.relay.bound_port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=name or DOMAIN) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der


@contextmanager
def pebble_asking_the_relay(work: Path, **kw: Any) -> Iterator[tuple[Pebble, int]]:
    """pebble whose DNS-01 checks ask 127.0.0.1:<port>, the port yielded for the relay."""
    dns_port = free_udp_port()
    pebble = start_pebble(work, f"127.0.0.1:{dns_port}", **kw)
    try:
        yield pebble, dns_port
    finally:
        pebble.stop()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        port: int = udp.getsockname()[1]
    return port


@contextmanager
def acme_relay(
    state_dir: Path,
    pebble: tuple[Pebble, int],
    *,
    clock: Callable[[], float] = time.time,
    retry_first: float = acme.RETRY_FIRST,
    renew: bool = True,
    caa: str | None = None,
) -> Iterator[AcmeRelay]:
    """A relay with --auto-cert at pebble, answering pebble's DNS-01 lookups itself;
    ``renew=False`` leaves starting the renewals (:meth:`AcmeRelay.renew`) to the test;
    ``caa`` is its ``--dns-caa``."""
    pebble, dns_port = pebble
    state_dir.mkdir(parents=True, exist_ok=True)
    key = tokens.generate_signing_key()
    public_key = state_dir / "token-public.pem"
    public_key.unlink(missing_ok=True)
    tokens.write_public_key(key, public_key)
    settings = acme.AcmeSettings(
        domain=DOMAIN,
        state_dir=state_dir,
        email="ops@example.com",
        directory=pebble.directory,
        ca_bundle=pebble.ca_bundle,
        issue_timeout=60,
        retry_first=retry_first,
        caa=caa,
    )
    config = RelayConfig(
        domain=DOMAIN,
        cert=settings.cert,
        key=settings.key,
        public_key=public_key,
        listen=(("127.0.0.1", 0),),
        state_dir=state_dir,
        auto_cert=True,
        dns_listen=(("127.0.0.1", dns_port),),
        public_ips=("127.0.0.1",),
        dns_caa=caa,
    )
    zone = dnsserver.dns_zone(config)
    assert zone is not None
    manager = acme.CertificateManager(settings, zone, caa=zone, clock=clock)
    thread = LoopThread("acme-relay")
    relay: Relay | None = None
    dns: dnsserver.DnsServer | None = None
    handle: AcmeRelay | None = None
    try:
        dns = thread.run(dnsserver.start_dns(config, zone=zone))
        thread.run(manager.ensure(), 90)
        relay = thread.run(Relay.start(config))

        handle = AcmeRelay(
            relay, manager, thread, pebble.write_root(state_dir / "root.pem"), key, state_dir
        )
        if renew:
            handle.renew()
        yield handle
    finally:
        if handle is not None:
            handle.stop_renewing()
        if relay is not None:
            runtime.run(runtime.close_all(f"{DOMAIN}:{relay.bound_port}"))
            thread.run(relay.close())
        if dns is not None:
            thread.run(dns.close())
        thread.stop(10)


def _curl(url: str, root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--fail", "--cacert", str(root), url + "/"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_cold_start_gets_a_wildcard_certificate_and_serves_a_tunnel(tmp_path: Path) -> None:
    with (
        pebble_asking_the_relay(tmp_path / "pebble") as pebble,
        acme_relay(tmp_path / "state", pebble) as relay,
        http_server() as server,
        burrow.forward(server.port, client=relay.client()) as tunnel,
    ):
        assert relay.manager.orders == 1
        out = _curl(tunnel.url, relay.root)
        assert out.returncode == 0, out.stderr
        assert server.marker in out.stdout
        # A visitor's handshake (SNI: the tunnel's name) and an agent's see the same
        # certificate: the one ACME got, for both names.
        assert relay.served(tunnel.url.split("//")[1].split(":")[0]) == relay.served()
        assert (relay.state_dir / "acme" / "key.pem").stat().st_mode & 0o077 == 0
        assert (relay.state_dir / "acme" / acme.ACCOUNT_KEY_FILE).stat().st_mode & 0o077 == 0


def test_a_restart_with_a_good_stored_certificate_places_no_order(tmp_path: Path) -> None:
    with pebble_asking_the_relay(tmp_path / "pebble") as pebble:
        with acme_relay(tmp_path / "state", pebble) as first:
            served = first.served()
            assert first.manager.orders == 1
        with acme_relay(tmp_path / "state", pebble) as second:
            assert second.manager.orders == 0
            assert second.served() == served


def test_with_the_ca_gone_the_relay_serves_on_and_retries_with_back_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="burrow.relay.acme")
    offset = 0.0

    def clock() -> float:
        return time.time() + offset

    with (
        pebble_asking_the_relay(tmp_path / "pebble", validity_seconds=3600) as pebble,
        acme_relay(tmp_path / "state", pebble, clock=clock, retry_first=0.2, renew=False) as relay,
        http_server() as server,
        burrow.forward(server.port, client=relay.client()) as tunnel,
    ):
        before = relay.served()
        pebble[0].stop()
        cert = relay.manager.current
        assert cert is not None
        # The relay's clock at 70% of the certificate's life: renewal is due, and less
        # than a third is left.
        offset = cert.not_before + 0.7 * cert.lifetime - time.time()
        relay.renew()
        wait_until(
            lambda: relay.manager.schedule is not None and relay.manager.schedule.failures >= 3,
            "three failed renewals",
            60,
        )
        failures = [r for r in caplog.records if "renewing the certificate" in r.getMessage()]
        delays = [float(r.getMessage().rsplit("next try in ", 1)[1].rstrip("s")) for r in failures]
        assert delays[:3] == sorted(delays[:3]) and delays[0] <= 0.2
        assert "cannot reach the ACME server" in failures[0].getMessage()
        assert relay.relay.metrics.renewals["failed"] >= 3  # and the metrics count them
        assert relay.relay.metrics.renewals["ok"] == 0
        assert any(
            r.levelno == logging.WARNING and "has not been renewed" in r.getMessage()
            for r in caplog.records
        )
        assert relay.served() == before
        out = _curl(tunnel.url, relay.root)
        assert out.returncode == 0, out.stderr


# -- CAA bound to the relay's account (RFC 8657) -----------------------------------------


def _dig_caa(port: int) -> str:
    out = subprocess.run(
        ["dig", "@127.0.0.1", "-p", str(port), DOMAIN, "CAA", "+short", "+norecurse"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout.strip()


def test_dns_caa_is_bound_to_the_relays_acme_account(tmp_path: Path) -> None:
    with pebble_asking_the_relay(tmp_path / "pebble") as pebble:
        _, dns_port = pebble
        with acme_relay(tmp_path / "state", pebble, caa="pebble.example") as relay:
            assert relay.manager.orders == 1
            account = relay.manager.caa_bound
            assert account is not None
            assert account.startswith(pebble[0].directory.removesuffix("/dir"))
            # pebble's directory names no CAA identity: the operator's --dns-caa is the CA.
            assert _dig_caa(dns_port) == f'0 issue "pebble.example; accounturi={account}"'
            resolver = dns.resolver.make_resolver_at("127.0.0.1", port=dns_port)
            assert [(r.flags, r.tag, r.value) for r in resolver.resolve(DOMAIN, "CAA")] == [
                (0, b"issue", f"pebble.example; accounturi={account}".encode())
            ]
        # A restart with the stored certificate places no order, and binds CAA all the
        # same: to the account the stored key has.
        with acme_relay(tmp_path / "state", pebble, caa="pebble.example") as relay:
            assert relay.manager.orders == 0
            wait_until(lambda: relay.manager.caa_bound == account, "CAA bound again")
            assert _dig_caa(dns_port) == f'0 issue "pebble.example; accounturi={account}"'


def test_without_dns_caa_no_caa_record_is_published(tmp_path: Path) -> None:
    with (
        pebble_asking_the_relay(tmp_path / "pebble") as pebble,
        acme_relay(tmp_path / "state", pebble) as relay,
    ):
        assert relay.manager.orders == 1
        assert relay.manager.caa_bound is None
        assert _dig_caa(pebble[1]) == ""


# -- renewals under load ---------------------------------------------------------------


class Visit(http.client.HTTPConnection):
    """HTTPS to a tunnel's ``host`` through the relay's port on 127.0.0.1, trusting
    pebble's root; ``fingerprint`` is the SHA-256 of the certificate it got."""

    def __init__(self, host: str, port: int, root: Path) -> None:
        super().__init__(host, port, timeout=10)
        self._context = ssl.create_default_context(cafile=str(root))
        self._context.set_alpn_protocols(["http/1.1"])
        self.fingerprint = ""

    def connect(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
        self.fingerprint = hashlib.sha256(
            self.sock.getpeercert(binary_form=True) or b""
        ).hexdigest()

    def get(self, close: bool = False) -> bytes:
        self.request("GET", "/page", headers={"connection": "close"} if close else {})
        response = self.getresponse()
        body = response.read()
        if response.status != 200:
            raise AssertionError(f"{response.status} {body[:200]!r}")
        return body


@dataclass
class Handshake:
    """A fresh connection: the certificate the relay served before it began and after
    it ended (what ``Relay.certificate`` said), and the one the client got."""

    before: str
    got: str
    after: str


@dataclass
class Load:
    """A kept-alive connection sending requests back to back, and a fresh TLS connection
    every ``FRESH_EVERY`` seconds, until told to stop."""

    relay: AcmeRelay
    host: str
    page: bytes
    stop: threading.Event = field(default_factory=threading.Event)
    requests: int = 0
    kept_alive_through: set[str] = field(default_factory=set)
    """The certificates the relay served while the kept-alive connection's requests ran."""
    handshakes: list[Handshake] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def serving(self) -> str:
        return self.relay.relay.certificate.fingerprint

    def kept_alive(self) -> None:
        visit = Visit(self.host, self.relay.relay.bound_port, self.relay.root)
        try:
            visit.connect()
            sock = visit.sock
            while not self.stop.is_set():
                try:
                    assert visit.get() == self.page
                    assert visit.sock is sock, "the connection was made again"
                except Exception as exc:  # every failure is counted
                    with self.lock:
                        self.failures.append(f"kept-alive: {exc!r}")
                    return
                with self.lock:
                    self.requests += 1
                    self.kept_alive_through.add(self.serving())
        finally:
            visit.close()

    def swaps(self, first: str) -> list[str]:
        """The certificates the relay swapped in after ``first``, in order."""
        with self.lock:
            served = [first] + [h.after for h in self.handshakes]
        return [new for old, new in itertools.pairwise(served) if new != old]

    def since_last_swap(self) -> int:
        """Fresh connections made wholly while the certificate served now was."""
        now = self.serving()
        with self.lock:
            return sum(h.before == h.after == now for h in self.handshakes)

    def fresh_connections(self) -> None:
        while not self.stop.wait(FRESH_EVERY):
            before = self.serving()
            visit = Visit(self.host, self.relay.relay.bound_port, self.relay.root)
            try:
                assert visit.get(close=True) == self.page
            except Exception as exc:  # every failure is counted
                with self.lock:
                    self.failures.append(f"fresh: {exc!r}")
                continue
            finally:
                visit.close()
            with self.lock:
                self.requests += 1
                self.handshakes.append(Handshake(before, visit.fingerprint, self.serving()))


def test_renewals_under_load_drop_nothing_and_new_handshakes_get_the_new_certificate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "burrow.relay")
    page = b"served through every renewal"
    with (
        pebble_asking_the_relay(tmp_path / "pebble", validity_seconds=SHORT_LIFE) as pebble,
        acme_relay(tmp_path / "state", pebble, retry_first=1) as relay,
        http_server(files={"page": page}) as server,
    ):
        opening = burrow.forward(server.port, client=relay.client())
        with opening as tunnel:
            agent = opening._session
            assert isinstance(agent, AgentSession)
            host = tunnel.url.removeprefix("https://").split(":")[0]
            load = Load(relay, host, page)
            first = load.serving()
            threads = [
                threading.Thread(target=load.kept_alive),
                threading.Thread(target=load.fresh_connections),
            ]
            for thread in threads:
                thread.start()
            try:
                # Until the relay has swapped in two renewed certificates and a few fresh
                # connections came after the last; bounded by the certificates' lives.
                wait_until(
                    lambda: len(load.swaps(first)) >= RENEWALS and load.since_last_swap() >= 3,
                    f"{RENEWALS} renewals under load",
                    (RENEWALS + 1) * SHORT_LIFE,
                )
            finally:
                load.stop.set()
                for thread in threads:
                    thread.join(30)
            swaps = load.swaps(first)
            print(
                f"\n{relay.manager.orders} orders, {len(swaps)} swaps: {load.requests} requests "
                f"({len(load.handshakes)} on fresh TLS connections), "
                f"{len(load.failures)} failed, {agent.reconnects} agent reconnects"
            )
            assert load.failures == []
            assert agent.reconnects == 0
            assert relay.manager.orders >= RENEWALS + 1
            assert len(swaps) >= RENEWALS and len(set(swaps)) == len(swaps)
            # burrow_relay_certificate_renewals_total counts them.
            renewed = relay.relay.metrics.renewals
            assert renewed["ok"] == relay.manager.orders - 1 and renewed["failed"] == 0
            assert first not in swaps
            # One step: a handshake got the certificate served when it began or, if a
            # swap came while it ran, the new one; never an older one.
            assert all(h.got in (h.before, h.after) for h in load.handshakes), load.handshakes
            # Every certificate was seen by fresh handshakes made wholly after its swap.
            for cert in swaps:
                assert any(h.before == h.after == h.got == cert for h in load.handshakes)
            # The kept-alive connection, made with the first certificate, went on
            # through every swap.
            assert load.kept_alive_through == {first, *swaps}
            # The relay serves what the ACME client stored last.
            stored = relay.manager.settings.cert.read_text()
            assert hashlib.sha256(ssl.PEM_cert_to_DER_cert(stored)).hexdigest() == swaps[-1]
            # Renewed on time, so never said to be overdue.
            assert "has not been renewed" not in caplog.text


# -- workers -------------------------------------------------------------------------------

# Certificates for the workers' test live this long: renewed after 8 s.
WORKERS_LIFE: Final = 12


def _fingerprint(pem_file: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem_file.read_text())).hexdigest()


def _served_by_every_worker(port: int, root: Path) -> set[str]:
    """The certificates fresh handshakes get. A name's handshake is done by the worker
    that owns it (a fixed hash of the name): sixteen names reach both workers."""
    context = ssl.create_default_context(cafile=str(root))
    seen = set()
    for label in (f"l{i:013d}" for i in range(16)):
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
            context.wrap_socket(sock, server_hostname=f"{label}.{DOMAIN}") as tls,
        ):
            seen.add(hashlib.sha256(tls.getpeercert(binary_form=True) or b"").hexdigest())
    return seen


def test_with_workers_the_first_certificate_comes_before_the_fork_and_worker_0_renews(
    tmp_path: Path,
) -> None:
    state, log = tmp_path / "state", tmp_path / "relay.log"
    key = tokens.generate_signing_key()
    public_key = tmp_path / "token-public.pem"
    tokens.write_public_key(key, public_key)
    port = free_port()
    with pebble_asking_the_relay(tmp_path / "pebble", validity_seconds=WORKERS_LIFE) as (
        pebble,
        dns_port,
    ):
        with log.open("wb") as out:
            relay = subprocess.Popen(
                [
                    *BURROW,
                    "relay",
                    "--domain",
                    DOMAIN,
                    "--auto-cert",
                    "--state-dir",
                    str(state),
                    "--token-key",
                    str(public_key),
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--workers",
                    "2",
                    "--acme-directory",
                    pebble.directory,
                    "--acme-ca-bundle",
                    str(pebble.ca_bundle),
                    "--dns-listen",
                    f"127.0.0.1:{dns_port}",
                    "--public-ip",
                    "127.0.0.1",
                ],
                env=clean_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=out,
            )
        try:
            # The listeners are bound once the first certificate is in.
            wait_for_port(port, timeout=60, alive=lambda: relay.poll() is None)
            root = pebble.write_root(tmp_path / "root.pem")
            cert = state / "acme" / acme.CERT_FILE
            first = _fingerprint(cert)
            assert _served_by_every_worker(port, root) == {first}
            wait_until(lambda: _fingerprint(cert) != first, "a renewal", 3 * WORKERS_LIFE)
            renewed = _fingerprint(cert)
            wait_until(
                lambda: _served_by_every_worker(port, root) == {renewed},
                "every worker serving the renewed certificate",
            )
        finally:
            stop(relay, sig=signal.SIGTERM)
    text = log.read_text()
    issued = [line for line in text.splitlines() if "issued, valid until" in line]
    assert len(issued) >= 2, text
    # The first from the supervisor before the fork, renewals from worker 0 alone.
    assert "acme[" not in issued[0] and all("acme[0]: " in line for line in issued[1:]), issued
    assert "acme[1]" not in text
    assert "[0]: TLS certificate" in text and "[1]: TLS certificate" in text, text
    assert "Traceback" not in text


# -- bad input: one line that says what to fix -----------------------------------


def _relay_cli(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    key = tokens.generate_signing_key()
    public_key = tmp_path / "token-public.pem"
    tokens.write_public_key(key, public_key)
    return subprocess.run(
        [
            *BURROW,
            "relay",
            "--domain",
            DOMAIN,
            "--auto-cert",
            "--state-dir",
            str(tmp_path / "state"),
            "--token-key",
            str(public_key),
            "--listen",
            "127.0.0.1:0",
            *args,
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_a_wrong_email_says_to_fix_acme_email(tmp_path: Path) -> None:
    with run_pebble(tmp_path / "pebble", DOMAIN) as pebble:
        result = _relay_cli(
            tmp_path,
            "--acme-directory",
            pebble.directory,
            "--acme-ca-bundle",
            str(pebble.ca_bundle),
            "--acme-email",
            "not an email",
        )
    line = _one_error_line(result)
    assert "refused the contact 'not an email'" in line and "fix --acme-email" in line


def test_an_unreachable_ca_says_so(tmp_path: Path) -> None:
    directory = f"https://localhost:{free_port()}/dir"
    result = _relay_cli(tmp_path, "--acme-directory", directory, "--acme-timeout", "5")
    line = _one_error_line(result)
    assert f"cannot reach the ACME server {directory}" in line
    assert "--acme-directory" in line


def test_an_untrusted_ca_says_to_give_acme_ca_bundle(tmp_path: Path) -> None:
    with run_pebble(tmp_path / "pebble", DOMAIN) as pebble:
        result = _relay_cli(tmp_path, "--acme-directory", pebble.directory)
    assert "--acme-ca-bundle" in _one_error_line(result)


def test_a_ca_that_refuses_the_names_says_so(tmp_path: Path) -> None:
    with run_pebble(tmp_path / "pebble", DOMAIN, blocklist=["localhost"]) as pebble:
        result = _relay_cli(
            tmp_path,
            "--acme-directory",
            pebble.directory,
            "--acme-ca-bundle",
            str(pebble.ca_bundle),
        )
    line = _one_error_line(result)
    assert f"refused to certify {DOMAIN} and *.{DOMAIN}" in line
    assert "rejectedIdentifier" in line


def test_a_zone_not_delegated_says_to_delegate_it(tmp_path: Path) -> None:
    # Nothing publishes the TXT records where pebble looks (the relay's DNS is not
    # the one pebble asks): as when the parent zone has no NS record for the relay.
    with run_pebble(tmp_path / "pebble", DOMAIN) as pebble:
        result = _relay_cli(
            tmp_path,
            "--acme-directory",
            pebble.directory,
            "--acme-ca-bundle",
            str(pebble.ca_bundle),
            "--acme-timeout",
            "20",
        )
    line = _one_error_line(result)
    assert f"_acme-challenge.{DOMAIN}" in line and f"delegate the zone {DOMAIN}" in line


def test_auto_cert_without_a_state_dir_is_a_usage_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [*BURROW, "relay", "--domain", DOMAIN, "--auto-cert", "--token-key", "k.pem"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--auto-cert needs --state-dir" in result.stderr
