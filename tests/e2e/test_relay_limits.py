"""The relay's limits, each a named constant with a clear error, against a real relay.

Tunnels per token (across sessions), tunnel creations per second per token,
visitors per tunnel, unfinished TLS handshakes.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from backends import http_server, tcp_echo_server
from harness import RelayHarness, run_relay

import burrow
from burrow.agent.client import runtime
from burrow.agent.session import AgentConfig, AgentSession
from burrow.exception import RelayError
from burrow.net.limits import raise_open_file_limit


def _session(relay: RelayHarness, token: str, variant: bool = False) -> AgentSession:
    # Configurations that differ (plain_data) make a second session of the same token.
    config = AgentConfig(relay.address, token, relay.ca, plain_data=variant)
    return runtime.run(AgentSession.connect(config))


@pytest.fixture
def sessions() -> Iterator[list[AgentSession]]:
    opened: list[AgentSession] = []
    yield opened
    for session in opened:
        runtime.run(session.close())


def _open(session: AgentSession, port: int) -> burrow.Tunnel:
    return runtime.run(session.open_tunnel(port, tcp=False, h2=False))


def test_tunnels_per_token_count_across_its_sessions(
    tmp_path: Path, sessions: list[AgentSession]
) -> None:
    with run_relay(tmp_path, max_tunnels_per_token=3) as relay:
        a, b = _session(relay, relay.token), _session(relay, relay.token, variant=True)
        other = _session(relay, relay.mint("other"))
        sessions += [a, b, other]
        first = _open(a, 1)
        _open(a, 2)
        _open(b, 3)
        with pytest.raises(RelayError, match="this token may hold at most 3 tunnels") as info:
            _open(b, 4)
        assert info.value.code == "limit"
        _open(other, 5)  # another token has its own quota
        runtime.run(a.close_tunnel(first))
        _open(b, 6)  # a closed tunnel gives its place back


def test_a_tokens_own_max_tunnels_scope_holds_across_sessions(
    tmp_path: Path, sessions: list[AgentSession]
) -> None:
    with run_relay(tmp_path) as relay:
        token = relay.mint("scoped", max_tunnels=2)
        a, b = _session(relay, token), _session(relay, token, variant=True)
        sessions += [a, b]
        _open(a, 1)
        _open(b, 2)
        with pytest.raises(RelayError, match="at most 2 tunnels"):
            _open(a, 3)


def test_tunnel_creations_per_second_per_token(
    tmp_path: Path, sessions: list[AgentSession]
) -> None:
    with run_relay(tmp_path, tunnel_creations_per_second=0.01, tunnel_creation_burst=3) as relay:
        a = _session(relay, relay.token)
        sessions.append(a)
        for port in (1, 2, 3):
            runtime.run(a.close_tunnel(_open(a, port)))
        with pytest.raises(RelayError, match="opens tunnels too fast") as info:
            _open(a, 4)
        assert info.value.code == "limit"
        b = _session(relay, relay.mint("patient"))
        sessions.append(b)
        _open(b, 5)  # the rate is per token


def test_visitors_per_tunnel(tmp_path: Path) -> None:
    with (
        run_relay(tmp_path, max_connections_per_tunnel=2) as relay,
        tcp_echo_server() as echo,
        burrow.forward(echo.port, unencrypted=True, client=relay.client()) as tunnel,
    ):
        port = tunnel.unencrypted_port or 0
        held: list[socket.socket] = []
        try:
            # One at a time, each echoing before the next connects.
            for _ in range(2):
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                held.append(sock)
                sock.sendall(b"ping")
                assert sock.recv(4) == b"ping"
            # Turned away with a reset (or a close): nothing comes back.
            with (
                contextlib.suppress(ConnectionResetError, BrokenPipeError),
                socket.create_connection(("127.0.0.1", port), timeout=10) as third,
            ):
                third.sendall(b"ping")
                assert third.recv(4) == b""
        finally:
            for sock in held:
                sock.close()
        # Once the two are gone (the agent has closed its side too), a visitor is
        # served again.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(ConnectionResetError, BrokenPipeError),
                socket.create_connection(("127.0.0.1", port), timeout=10) as again,
            ):
                again.sendall(b"pong")
                if again.recv(4) == b"pong":
                    break
            time.sleep(0.05)
        else:
            raise AssertionError("no visitor was served after the others left")


def _curl(relay: RelayHarness, url: str) -> str:
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "--cacert", str(relay.ca), url + "/ok"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return out.stdout


def _idle_sockets(port: int, count: int) -> list[socket.socket]:
    idle = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.connect(("127.0.0.1", port))
        idle.append(sock)
    return idle


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_oldest_unfinished_handshakes_make_room_for_new_visitors_and_agents(
    tmp_path: Path,
) -> None:
    with (
        # No handshake timeout to speak of: only eviction can close the idle sockets.
        run_relay(tmp_path, max_pending_handshakes=50, handshake_timeout=600) as relay,
        http_server(files={"ok": b"served\n"}) as server,
    ):
        idle = _idle_sockets(relay.port, 200)
        try:
            # A new agent and a new visitor get through the crowd of silent sockets.
            with burrow.forward(server.port, client=relay.client(relay.mint("late"))) as tunnel:
                assert _curl(relay, tunnel.url) == "served\n"
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                dropped = sum(_closed_by_peer(sock) for sock in idle)
                if dropped >= 150:
                    break
                time.sleep(0.05)
            assert dropped >= 150  # the oldest made room, so at most 50 wait
        finally:
            for sock in idle:
                sock.close()


def test_five_thousand_idle_sockets_do_not_stop_visitors_or_agents(tmp_path: Path) -> None:
    raise_open_file_limit()
    with (
        run_relay(tmp_path) as relay,
        http_server(files={"ok": b"still served\n"}) as server,
    ):
        idle = _idle_sockets(relay.port, 5000)
        try:
            with burrow.forward(server.port, client=relay.client(relay.mint("new"))) as tunnel:
                assert _curl(relay, tunnel.url) == "still served\n"
        finally:
            for sock in idle:
                sock.close()
