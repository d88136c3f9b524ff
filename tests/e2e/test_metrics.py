"""A relay's /metrics after a known mix of visitors: every counter exact, the gauges back
to zero once the visitors are gone; the same summed over ``--workers 2``; and as many
series with 10,000 tunnels as with 10."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import urllib.request
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from backends import http_server, tcp_echo_server
from devrelay import dev_workers
from harness import RelayHarness, run_relay, wait_until
from prometheus_client.parser import text_string_to_metric_families

import burrow
from burrow import tokens
from burrow.agent.client import runtime
from burrow.exception import AuthError
from burrow.relay import server
from burrow.relay.session import RelaySession

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]
TIMEOUT = 20
REQUEST = b"GET /id HTTP/1.0\r\nHost: tunnel\r\n\r\n"


def scrape(url: str) -> Series:
    with urllib.request.urlopen(url + "/metrics", timeout=TIMEOUT) as response:
        text = response.read().decode()
    found: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


def by(series: Series, name: str) -> dict[tuple[str, ...], float]:
    """``name``'s samples by their label values (in label-name order)."""
    return {
        tuple(value for _, value in labels): v for (n, labels), v in series.items() if n == name
    }


def one(series: Series, name: str) -> float:
    return series[name, ()]


@dataclass
class Tally:
    """Bytes visitors sent and got back through tunnels, as the relay should count them."""

    sent: int = 0
    received: int = 0


def https_visit(
    port: int, host: str, ca: Path, tally: Tally | None, alpn: str | None = None
) -> bytes:
    context = ssl.create_default_context(cafile=str(ca))
    if alpn:
        context.set_alpn_protocols([alpn])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=host) as sock,
    ):
        if alpn == "h2":
            return sock.selected_alpn_protocol().encode()
        sock.sendall(REQUEST)
        chunks = []
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    answer = b"".join(chunks)
    if tally is not None:
        tally.sent += len(REQUEST)
        tally.received += len(answer)
    return answer


def tcp_visit(port: int, payload: bytes, tally: Tally | None) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        with contextlib.suppress(OSError):  # a refused visitor may be closed already
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        with contextlib.suppress(ConnectionError):
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    answer = b"".join(chunks)
    if tally is not None:
        tally.sent += len(payload)
        tally.received += len(answer)
    return answer


def session_of(relay: RelayHarness) -> RelaySession:
    async def find() -> RelaySession:
        (session,) = relay.relay.registry.sessions.values()
        assert isinstance(session, RelaySession)
        return session

    return relay.call(find())


def drop_pool(relay: RelayHarness, session: RelaySession) -> None:
    """Drop the session's pooled data connections, as if the path to the agent lost them,
    and let the relay believe new ones are on their way (so it asks for none)."""

    async def drop() -> None:
        while (channel := session._take_pooled()) is not None:
            channel.close()
        session._dialed.extend([float("inf")] * 100)

    relay.call(drop())


def restore_pool(relay: RelayHarness, session: RelaySession) -> None:
    async def restore() -> None:
        session._dialed.clear()
        session._refill()

    relay.call(restore())


def test_every_counter_is_exact_after_a_known_mix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "POOL_WAIT_SECONDS", 1.0)
    with (
        run_relay(tmp_path, metrics_listen=("127.0.0.1", 0), admin_token="t" * 32) as relay,
        http_server(files={"id": b"hello from the tunnel\n"}) as web,
        http_server(files={"id": b"nobody may see this\n"}) as fenced,
        tcp_echo_server() as echo,
        ExitStack() as stack,
    ):
        assert relay.thread.admin is not None
        url = relay.thread.admin.url
        client = relay.client()
        page = stack.enter_context(burrow.forward(web.port, client=client))
        raw = stack.enter_context(burrow.forward(echo.port, client=client, unencrypted=True))
        closed = stack.enter_context(
            burrow.forward(
                fenced.port,
                client=client,
                unencrypted=True,
                inbound_cidr_allowlist=["192.0.2.0/24"],
            )
        )
        # Nothing listens on its port: no visitor gets that far.
        fenced_h2 = stack.enter_context(
            burrow.forward(
                1099, client=client, h2_enabled=True, inbound_cidr_allowlist=["192.0.2.0/24"]
            )
        )
        session = session_of(relay)
        wait_until(lambda: session.pooled == relay.relay.config.pool_size, "a full pool")
        tally = Tally()
        for _ in range(3):
            assert b"hello from the tunnel" in https_visit(relay.port, page.host, relay.ca, tally)
        for _ in range(2):
            assert tcp_visit(raw.tcp_socket[1], b"x" * 1000, tally) == b"x" * 1000
        for name in ("nosuch1", "nosuch2"):
            answer = https_visit(relay.port, f"{name}.r1.localhost", relay.ca, None)
            assert answer.startswith(b"HTTP/1.1 404")
        assert https_visit(relay.port, "nosuch3.r1.localhost", relay.ca, None).startswith(
            b"HTTP/1.1 404"
        )
        assert https_visit(relay.port, fenced_h2.host, relay.ca, None, alpn="h2") == b"h2"
        assert https_visit(relay.port, closed.host, relay.ca, None).startswith(b"HTTP/1.1 403")
        assert tcp_visit(closed.tcp_socket[1], b"let me in", None) == b""
        # A data connection dropped on its way: the visitor waits, then is turned away.
        wait_until(lambda: session.pooled == relay.relay.config.pool_size, "a full pool")
        drop_pool(relay, session)
        assert https_visit(relay.port, page.host, relay.ca, None) == b""
        restore_pool(relay, session)
        # Plain text on the TLS port, and a token signed by someone else.
        with socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 400")
        forged = tokens.mint(tokens.generate_signing_key(), subject="x", ttl_seconds=60)
        with pytest.raises(AuthError), burrow.forward(1098, client=relay.client(forged)):
            pass

        def settled() -> Series | None:
            series = scrape(url)
            quiet = one(series, "burrow_relay_visitors_connected") == 0
            return series if quiet and one(series, "burrow_relay_handshakes_pending") == 0 else None

        series = wait_until(settled, "the visitors to be gone")
        assert isinstance(series, dict)
        visitors = by(series, "burrow_relay_visitors_total")
        expected = {key: 0.0 for key in visitors}
        expected |= {
            ("https", "joined"): 3,
            ("tcp", "joined"): 2,
            ("https", "unknown-name"): 3,
            ("https", "allowlist"): 1,
            ("h2", "allowlist"): 1,
            ("tcp", "allowlist"): 1,
            ("https", "no-data-connection"): 1,
        }
        assert visitors == expected
        assert by(series, "burrow_relay_tunnel_opens_total") == {
            ("https",): 1, ("tcp",): 2, ("h2",): 1,
        }  # fmt: skip
        assert set(by(series, "burrow_relay_tunnel_open_errors_total").values()) == {0}
        assert by(series, "burrow_relay_tunnels") == {("https",): 1, ("tcp",): 2, ("h2",): 1}
        assert one(series, "burrow_relay_sessions") == 1
        assert by(series, "burrow_relay_bytes_total") == {
            ("to-agent",): tally.sent,
            ("to-visitor",): tally.received,
        }
        assert one(series, "burrow_relay_data_connection_wait_seconds_count") == 5
        failures = by(series, "burrow_relay_auth_failures_total")
        assert failures[("unknown-key",)] == 1
        assert sum(failures.values()) == 1
        assert by(series, "burrow_relay_tls_handshakes_total")[("failed",)] == 1
        # Each TLS visitor, the agent's control connection and its data connections.
        ok = by(series, "burrow_relay_tls_handshakes_total")[("ok",)]
        assert ok >= 3 + 3 + 1 + 1 + 1 + 1 + 1
        assert one(series, "burrow_relay_tls_handshake_seconds_count") == ok
        assert set(by(series, "burrow_relay_sessions_ended_total").values()) == {0}
        status = json.loads(
            urllib.request.urlopen(
                urllib.request.Request(
                    url + "/api/status", headers={"authorization": "Bearer " + "t" * 32}
                ),
                timeout=TIMEOUT,
            ).read()
        )
        assert status["counts"]["tunnels"] == 4
        assert status["counts"]["bytes_to_agent"] == tally.sent
        reasons = [r["reason"] for r in status["refusals"]]
        assert sorted(reasons) == sorted(
            ["unknown-name"] * 3 + ["allowlist"] * 3 + ["no-data-connection", "agent-refused"]
        )
        stack.close()
        runtime.run(runtime.close_all(relay.address))

        def ended() -> Series | None:
            series = scrape(url)
            return series if one(series, "burrow_relay_sessions") == 0 else None

        series = wait_until(ended, "the session to end")
        assert isinstance(series, dict)
        for gauge in (
            "sessions",
            "visitors_connected",
            "handshakes_pending",
            "pooled_data_connections",
        ):
            assert one(series, f"burrow_relay_{gauge}") == 0, gauge
        assert set(by(series, "burrow_relay_tunnels").values()) == {0}
        assert by(series, "burrow_relay_sessions_ended_total")[("agent-closed",)] == 1


def test_series_stay_as_many_with_ten_thousand_tunnels(tmp_path: Path) -> None:
    many = 10_000
    with run_relay(
        tmp_path,
        metrics_listen=("127.0.0.1", 0),
        max_tunnels_per_session=many + 10,
        max_tunnels_per_token=many + 10,
        tunnel_creations_per_second=1e6,
        tunnel_creation_burst=many + 10,
    ) as relay:
        assert relay.thread.admin is not None
        url = relay.thread.admin.url
        client = relay.client()
        empty = scrape(url)

        opened: list[int] = []

        async def open_tunnels(count: int, stack: AsyncExitStack) -> None:
            # Ports need not listen: a tunnel is published whether or not anything does.
            for port in range(1025 + len(opened), 1025 + count):
                await stack.enter_async_context(burrow.forward(port, client=client))
                opened.append(port)

        async def scenario() -> tuple[Series, Series]:
            async with AsyncExitStack() as stack:
                await open_tunnels(10, stack)
                ten = await asyncio.to_thread(scrape, url)
                await open_tunnels(many, stack)
                lots = await asyncio.to_thread(scrape, url)
                return ten, lots

        ten, lots = asyncio.run(scenario())
        assert by(ten, "burrow_relay_tunnels")[("https",)] == 10
        assert by(lots, "burrow_relay_tunnels")[("https",)] == many
        assert len(ten) == len(lots) == len(empty)
        assert set(ten) == set(lots)


# -- workers -------------------------------------------------------------------------


def test_workers_figures_are_summed_and_a_worker_that_exits_stops_counting(
    tmp_path: Path,
) -> None:
    with (
        dev_workers(tmp_path, 2, "--metrics", "127.0.0.1:0") as relay,
        http_server(files={"id": b"hello\n"}) as web,
        ExitStack() as stack,
    ):
        url = relay.metrics_url()
        ca = Path(relay.settings["BURROW_CA"])
        port = int(relay.settings["BURROW_RELAY"].rsplit(":", 1)[1])
        # Sessions land on both workers (their ids hash to one or the other).
        # Tunnels need no listener to be published: only the first is visited.
        tunnels = [
            stack.enter_context(
                burrow.forward(web.port if i == 0 else 1100 + i, client=relay.client(f"s{i}"))
            )
            for i in range(8)
        ]
        sessions = _api(url, "/api/sessions")["sessions"]
        assert len(sessions) == 8
        assert {s["worker"] for s in sessions} == {0, 1}
        tally = Tally()
        for tunnel in tunnels[:1]:
            for _ in range(3):
                assert b"hello" in https_visit(port, tunnel.host, ca, tally)
        for name in ("nosuch1", "nosuch2", "nosuch3", "nosuch4"):
            https_visit(port, f"{name}.r1.localhost", ca, None)

        def settled() -> Series | None:
            series = scrape(url)
            done = one(series, "burrow_relay_visitors_connected") == 0
            return series if done else None

        series = wait_until(settled, "the visitors to be gone")
        assert isinstance(series, dict)
        assert one(series, "burrow_relay_workers") == 2
        assert one(series, "burrow_relay_sessions") == 8
        assert by(series, "burrow_relay_tunnels")[("https",)] == 8
        visitors = by(series, "burrow_relay_visitors_total")
        assert visitors[("https", "joined")] == 3
        assert visitors[("https", "unknown-name")] == 4
        assert by(series, "burrow_relay_bytes_total") == {
            ("to-agent",): tally.sent,
            ("to-visitor",): tally.received,
        }
        assert by(series, "burrow_relay_tunnel_opens_total")[("https",)] == 8
        assert len(by(series, "burrow_relay_build_info")) == 1

        # Worker 1 dies: its gauges stop counting at once, its counters stay.
        victim = relay.workers()[1]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: victim not in relay.workers(), "the worker to go")
        after = scrape(url)
        assert by(after, "burrow_relay_visitors_total") == visitors
        assert by(after, "burrow_relay_tunnel_opens_total")[("https",)] >= 8
        wait_until(lambda: len(relay.workers()) == 2, "the worker to be started again")
        # Every agent comes back (to whichever worker owns its new session).
        wait_until(lambda: one(scrape(url), "burrow_relay_sessions") == 8, "the sessions back")
        again = scrape(url)
        assert one(again, "burrow_relay_workers") == 2
        assert by(again, "burrow_relay_visitors_total")[("https", "joined")] == 3
        stack.close()
        runtime.run(runtime.close_all(relay.settings["BURROW_RELAY"]))
        wait_until(lambda: one(scrape(url), "burrow_relay_sessions") == 0, "the sessions to end")
        final = scrape(url)
        assert set(by(final, "burrow_relay_tunnels").values()) == {0}
        assert one(final, "burrow_relay_pooled_data_connections") == 0


def _api(url: str, path: str) -> dict[str, list[dict[str, object]]]:
    with urllib.request.urlopen(url + path, timeout=TIMEOUT) as response:
        answer = json.loads(response.read())
    assert isinstance(answer, dict)
    return answer
