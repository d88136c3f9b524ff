"""A new certificate without a restart: swapped under load, read from replaced files,
refused when bad; and claims that outlive the TLS key.

Real relays on loopback, real agents, real TLS from the dev CA: every certificate
here is a fresh leaf of one CA, so clients that pin the CA trust them all, and a
handshake tells which one it got by the fingerprint of the peer's certificate.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import itertools
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from backends import free_port, http_server
from devrelay import dev_relay
from harness import DOMAIN, RelayHarness, run_relay, wait_until
from leaves import new_leaf

import burrow
from burrow import tokens
from burrow.agent.client import runtime
from burrow.agent.session import AgentSession
from burrow.net import devca
from burrow.relay import claimsecret
from burrow.relay.certs import CERT_CHECK_SECONDS, CertificateError
from burrow.relay.config import RelayConfig
from burrow.relay.process import RelayThread
from burrow.wire import protocol

PAGE = b"served through every certificate"

# Certificates swapped in during the load test, about a second apart.
SWAPS = 4
# A fresh visitor connection this often, as the issue asks.
FRESH_EVERY = 0.1
# Connections kept alive (HTTP/1.1 keep-alive) across all the swaps.
KEPT_ALIVE = 2


def fingerprint_of(cert: Path) -> str:
    """SHA-256 of a PEM file's first certificate, as a client sees it (DER)."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()


def client_context(ca: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["http/1.1"])
    return context


class Visit(http.client.HTTPConnection):
    """HTTPS to ``host`` through the relay's port on 127.0.0.1 (``*.localhost`` may not
    resolve here), checking the certificate against the dev CA."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=10)
        self._context = context
        self.fingerprint = ""

    def connect(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
        self.fingerprint = hashlib.sha256(
            self.sock.getpeercert(binary_form=True) or b""
        ).hexdigest()

    def get(self, path: str = "/page", close: bool = False) -> bytes:
        self.request("GET", path, headers={"connection": "close"} if close else {})
        response = self.getresponse()
        body = response.read()
        if response.status != 200:
            raise AssertionError(f"{response.status} {body[:200]!r}")
        return body


@contextlib.contextmanager
def tunnel_to_page(relay: RelayHarness) -> Iterator[tuple[burrow.Tunnel, AgentSession]]:
    with http_server(files={"page": PAGE}) as server:
        opening = burrow.forward(server.port, client=relay.client())
        with opening as tunnel:
            agent = opening._session
            assert isinstance(agent, AgentSession)
            yield tunnel, agent


def handshake_fingerprint(relay: RelayHarness, host: str) -> str:
    visit = Visit(host, relay.port, client_context(relay.ca))
    try:
        assert visit.get(close=True) == PAGE
    finally:
        visit.close()
    return visit.fingerprint


def peer(relay: RelayHarness, host: str, alpn: list[str]) -> tuple[str, str | None]:
    """A handshake alone: the fingerprint of the certificate it got, and the ALPN chosen."""
    context = ssl.create_default_context(cafile=str(relay.ca))
    context.set_alpn_protocols(alpn)
    with (
        socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True) or b""
        return hashlib.sha256(der).hexdigest(), tls.selected_alpn_protocol()


def install(relay: RelayHarness, cert: Path, key: Path) -> None:
    async def on_the_loop() -> None:
        relay.relay.use_certificate(cert, key)

    relay.call(on_the_loop())


# -- a swap under steady load ------------------------------------------------------


@dataclass
class Fresh:
    started: float
    ended: float
    fingerprint: str


@dataclass
class Load:
    """Visitors that run until told to stop, and what they saw."""

    relay: RelayHarness
    host: str
    stop: threading.Event = field(default_factory=threading.Event)
    kept_alive_requests: int = 0
    fresh: list[Fresh] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def kept_alive(self) -> None:
        visit = Visit(self.host, self.relay.port, client_context(self.relay.ca))
        try:
            visit.connect()
            sock = visit.sock
            while not self.stop.is_set():
                try:
                    assert visit.get() == PAGE
                    assert visit.sock is sock, "the connection was made again"
                except Exception as exc:  # every failure is counted
                    with self.lock:
                        self.failures.append(f"kept-alive: {exc!r}")
                    return
                with self.lock:
                    self.kept_alive_requests += 1
                time.sleep(0.005)
        finally:
            visit.close()

    def fresh_connections(self) -> None:
        context = client_context(self.relay.ca)
        while not self.stop.wait(FRESH_EVERY):
            started = time.monotonic()
            visit = Visit(self.host, self.relay.port, context)
            try:
                assert visit.get(close=True) == PAGE
            except Exception as exc:  # every failure is counted
                with self.lock:
                    self.failures.append(f"fresh: {exc!r}")
                continue
            finally:
                visit.close()
            with self.lock:
                self.fresh.append(Fresh(started, time.monotonic(), visit.fingerprint))


def test_certificates_swapped_under_load_drop_nothing_and_serve_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "burrow.relay")
    with run_relay(tmp_path / "state") as relay, tunnel_to_page(relay) as (tunnel, agent):
        host = tunnel.url.removeprefix("https://").split(":")[0]
        leaves = [new_leaf(relay.state_dir, tmp_path / f"leaf{i}", DOMAIN) for i in range(SWAPS)]
        load = Load(relay, host)
        threads = [threading.Thread(target=load.kept_alive) for _ in range(KEPT_ALIVE)]
        threads.append(threading.Thread(target=load.fresh_connections))
        for thread in threads:
            thread.start()
        # (time the swap began, time it was done, what handshakes must see after it)
        swaps = [(0.0, time.monotonic(), fingerprint_of(relay.relay.config.cert))]
        try:
            for leaf in leaves:
                time.sleep(1.0)
                began = time.monotonic()
                install(relay, leaf.cert, leaf.key)
                swaps.append((began, time.monotonic(), fingerprint_of(leaf.cert)))
            time.sleep(1.0)
        finally:
            load.stop.set()
            for thread in threads:
                thread.join(30)
        swaps.append((float("inf"), float("inf"), ""))

        fresh_total = len(load.fresh)
        print(
            f"\n{SWAPS} swaps: {load.kept_alive_requests} kept-alive requests on {KEPT_ALIVE} "
            f"connections, {fresh_total} fresh TLS connections, "
            f"{len(load.failures)} failed, {agent.reconnects} agent reconnects"
        )
        assert load.failures == []
        assert agent.reconnects == 0
        assert load.kept_alive_requests > 20 * SWAPS  # they went on through every swap
        # Every handshake made wholly between two swaps saw the newer certificate.
        for (_, done, expected), (next_began, _, _) in itertools.pairwise(swaps):
            between = [f for f in load.fresh if f.started > done and f.ended < next_began]
            assert len(between) >= 3, (done, next_began, load.fresh)
            assert {f.fingerprint for f in between} == {expected}
        assert handshake_fingerprint(relay, host) == swaps[-2][2]
        assert caplog.text.count("in use for new handshakes") == SWAPS


# -- files replaced on disk ----------------------------------------------------------


def replace_file(source: Path, target: Path) -> None:
    """As renewal tools do: a new file renamed over the old one."""
    temporary = target.with_name(f".{target.name}.new")
    temporary.write_bytes(source.read_bytes())
    os.replace(temporary, target)


def test_a_pair_replaced_on_disk_is_served_without_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with run_relay(tmp_path / "state") as relay, tunnel_to_page(relay) as (tunnel, agent):
        host = tunnel.url.removeprefix("https://").split(":")[0]
        config = relay.relay.config
        before = fingerprint_of(config.cert)
        assert handshake_fingerprint(relay, host) == before
        renewed = new_leaf(relay.state_dir, tmp_path / "renewed", DOMAIN)

        # The key first, and long enough for the relay to look at the mismatch twice.
        replace_file(renewed.key, config.key)
        time.sleep(2.5 * CERT_CHECK_SECONDS)
        assert handshake_fingerprint(relay, host) == before
        replace_file(renewed.cert, config.cert)

        after = fingerprint_of(renewed.cert)
        wait_until(lambda: handshake_fingerprint(relay, host) == after, "the renewed certificate")
        assert relay.relay.certificate.fingerprint == after
        assert agent.reconnects == 0
        # All three contexts changed: an HTTP/2 tunnel's, and agents' (the relay's own name).
        with (
            http_server() as server,
            burrow.forward(server.port, h2_enabled=True, client=relay.client()) as h2_tunnel,
        ):
            h2_host = h2_tunnel.url.removeprefix("https://").split(":")[0]
            assert peer(relay, h2_host, ["h2"]) == (after, "h2")
        assert peer(relay, DOMAIN, [protocol.ALPN_CONTROL]) == (after, protocol.ALPN_CONTROL)
        # The half-replaced pair was refused, once, with the reason.
        refused = [r for r in caplog.records if "refused the changed" in r.getMessage()]
        assert len(refused) == 1 and "the key does not match" in refused[0].getMessage()


# -- bad certificates are refused -----------------------------------------------------


def test_a_bad_pair_is_refused_with_one_line_and_the_old_one_stays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "burrow.relay")
    with run_relay(tmp_path / "state") as relay, tunnel_to_page(relay) as (tunnel, _):
        host = tunnel.url.removeprefix("https://").split(":")[0]
        config = relay.relay.config
        before = fingerprint_of(config.cert)
        other = new_leaf(relay.state_dir, tmp_path / "other", DOMAIN)
        foreign = devca.ensure_dev_certificates(tmp_path / "foreign", "r2.localhost")
        expired = devca.ensure_dev_certificates(
            tmp_path / "expired", DOMAIN, now=relay.relay.certificate.not_before.replace(year=2020)
        )
        cases = [
            ((config.cert, other.key), "the key does not match the certificate"),
            ((foreign.cert, foreign.key), "does not cover r1.localhost and *.r1.localhost"),
            ((expired.cert, expired.key), "it expired at"),
        ]
        for (cert, key), reason in cases:
            caplog.clear()
            with pytest.raises(CertificateError, match=reason.replace("*", r"\*")):
                install(relay, cert, key)
            lines = [r.getMessage() for r in caplog.records]
            assert len(lines) == 1 and reason in lines[0], lines
            assert "still serving the last good one" in lines[0]
            assert handshake_fingerprint(relay, host) == before

        # The same through the watched files: one line, and the old certificate stays.
        caplog.clear()
        replace_file(foreign.key, config.key)
        replace_file(foreign.cert, config.cert)
        wait_until(lambda: "refused the changed" in caplog.text, "the refusal")
        time.sleep(2 * CERT_CHECK_SECONDS)
        assert caplog.text.count("refused the changed") == 1, caplog.text
        assert handshake_fingerprint(relay, host) == before


# -- claims outlive the TLS key ---------------------------------------------------------


@dataclass
class Restartable:
    """A relay on a fixed port that can be stopped and started with other files."""

    config: RelayConfig
    thread: RelayThread | None = None

    def start(self, **changes: object) -> None:
        self.config = replace(self.config, **changes)  # type: ignore[arg-type]
        self.thread = RelayThread(self.config, name="test-relay")
        self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.thread.stop()
            self.thread = None

    def labels(self) -> set[str]:
        assert self.thread is not None
        return set(self.thread.relay.routes)


@contextlib.contextmanager
def restartable(
    tmp_path: Path, state_dir: Path | None
) -> Iterator[tuple[Restartable, burrow.Client, Path]]:
    """A relay for ``r1.localhost`` with the dev CA, a client of it, and the CA's certificate."""
    certs = devca.ensure_dev_certificates(tmp_path / "ca", DOMAIN)
    signing = tokens.generate_signing_key()
    public = tmp_path / "token-public.pem"
    tokens.write_public_key(signing, public)
    port = free_port()
    relay = Restartable(
        RelayConfig(
            domain=DOMAIN,
            cert=certs.cert,
            key=certs.key,
            public_key=public,
            listen=(("127.0.0.1", port),),
            state_dir=state_dir,
        )
    )
    client = burrow.Client(
        relay=f"{DOMAIN}:{port}",
        token=tokens.mint(signing, subject="claims", ttl_seconds=3600),
        ca=str(certs.ca_cert),
    )
    relay.start()
    try:
        yield relay, client, certs.ca_cert
    finally:
        runtime.run(runtime.close_all(f"{DOMAIN}:{port}"))
        relay.stop()


def restarted_gives_the_name_back(
    relay: Restartable, agent: AgentSession, tunnel: burrow.Tunnel, ca: Path, **changes: object
) -> bool:
    """Restart ``relay`` with ``changes``: whether the agent's tunnel came back, and serves."""
    label = tunnel.url.removeprefix("https://").split(".")[0]
    assert relay.labels() == {label}
    reconnects = agent.reconnects
    relay.stop()
    relay.start(**changes)
    wait_until(lambda: agent.reconnects == reconnects + 1, "the agent to reconnect")
    wait_until(lambda: not agent.tunnels or relay.labels(), "the tunnel reopened or refused")
    if not agent.tunnels:
        return False
    assert relay.labels() == {label}
    host = tunnel.url.removeprefix("https://").split(":")[0]
    visit = Visit(host, relay.config.listen[0][1], client_context(ca))
    try:
        assert visit.get(close=True) == PAGE
    finally:
        visit.close()
    return True


@contextlib.contextmanager
def forwarded(client: burrow.Client) -> Iterator[tuple[burrow.Tunnel, AgentSession]]:
    with http_server(files={"page": PAGE}) as server:
        opening = burrow.forward(server.port, client=client)
        with opening as tunnel:
            agent = opening._session
            assert isinstance(agent, AgentSession)
            yield tunnel, agent


def test_claims_bring_the_names_back_through_a_relay_with_a_new_tls_key(tmp_path: Path) -> None:
    state = tmp_path / "relay-state"
    with restartable(tmp_path, state) as (relay, client, ca), forwarded(client) as (tunnel, agent):
        for renewal in range(2):
            renewed = new_leaf(tmp_path / "ca", tmp_path / f"renewed{renewal}", DOMAIN)
            assert restarted_gives_the_name_back(
                relay, agent, tunnel, ca, cert=renewed.cert, key=renewed.key
            )


def test_without_its_claim_secret_a_relay_with_a_new_key_loses_the_names(tmp_path: Path) -> None:
    # What the claim secret is for: signed with the TLS key alone, claims die with it.
    with restartable(tmp_path, None) as (relay, client, ca), forwarded(client) as (tunnel, agent):
        renewed = new_leaf(tmp_path / "ca", tmp_path / "renewed", DOMAIN)
        assert not restarted_gives_the_name_back(
            relay, agent, tunnel, ca, cert=renewed.cert, key=renewed.key
        )


def test_a_relay_with_no_claim_secret_yet_derives_it_so_old_claims_hold(tmp_path: Path) -> None:
    state = tmp_path / "relay-state"
    # A relay as before the claim secret: no state dir, claims signed with its TLS key.
    with restartable(tmp_path, None) as (relay, client, ca), forwarded(client) as (tunnel, agent):
        key = relay.config.key
        assert restarted_gives_the_name_back(relay, agent, tunnel, ca, state_dir=state)
        secret = state / claimsecret.CLAIM_SECRET_FILE
        assert secret.stat().st_mode & 0o777 == 0o600
        assert bytes.fromhex(secret.read_text()) == claimsecret.derive(key.read_bytes())
        # From now on the key may change.
        renewed = new_leaf(tmp_path / "ca", tmp_path / "renewed", DOMAIN)
        assert restarted_gives_the_name_back(
            relay, agent, tunnel, ca, cert=renewed.cert, key=renewed.key
        )


# -- every worker -------------------------------------------------------------------------


def test_every_worker_serves_a_pair_replaced_on_disk(tmp_path: Path) -> None:
    with dev_relay(tmp_path, "--workers", "2") as relay:
        state = relay.state_dir
        # Written by the parent before the fork, from the dev certificate's key.
        secret = state / claimsecret.CLAIM_SECRET_FILE
        assert secret.stat().st_mode & 0o777 == 0o600
        key = state / devca.LEAF_KEY_FILE
        assert bytes.fromhex(secret.read_text()) == claimsecret.derive(key.read_bytes())

        context = client_context(Path(relay.ca))
        # Unknown labels get a 404, after a handshake in the worker that owns them (a
        # fixed hash of the name): sixteen names reach both workers.
        hosts = [f"{label}.{DOMAIN}" for label in (f"l{i:013d}" for i in range(16))]

        def fingerprints() -> set[str]:
            seen = set()
            for host in hosts:
                with (
                    socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock,
                    context.wrap_socket(sock, server_hostname=host) as tls,
                ):
                    seen.add(hashlib.sha256(tls.getpeercert(binary_form=True) or b"").hexdigest())
            return seen

        assert fingerprints() == {fingerprint_of(state / devca.LEAF_CERT_FILE)}
        renewed = new_leaf(state, tmp_path / "renewed", DOMAIN)
        replace_file(renewed.cert, state / devca.LEAF_CERT_FILE)
        replace_file(renewed.key, key)
        wait_until(lambda: fingerprints() == {fingerprint_of(renewed.cert)}, "every worker")
        log = relay.log.read_text()
        assert "[0]: TLS certificate" in log and "[1]: TLS certificate" in log, log
