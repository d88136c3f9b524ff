"""Tenants against each other at a real relay: a token's life, its TCP ports, its
names, and the log lines its strings end up in.

Real relays on loopback (one process, or ``--workers 2``), real agents
(``burrow.forward``) and, where a hostile or hand-steered agent is needed,
the protocol spoken by hand (:class:`RawConnection`). Time is moved on by
setting the relay's clocks, never by waiting for it.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import errno
import json
import logging
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from backends import free_port, http_server
from e2e.test_relay_security import (
    REVOKED_WITHIN,
    TIMEOUT,
    RawConnection,
    RawSession,
    assert_not_found,
    assert_serves,
    raw_session,
    relay_logs,
    sessions_of,
    wait_until,
)
from e2e.test_relay_workers import dev_workers
from harness import DOMAIN, RelayHarness, run_relay

import burrow
from burrow import tokens
from burrow.agent.session import AgentSession
from burrow.exception import AuthError
from burrow.relay.ports import PORT_GRACE_SECONDS
from burrow.wire import protocol

BURROW = [sys.executable, "-m", "burrow"]


# -- steering the relay ----------------------------------------------------------------


async def _set_token_clock(relay: RelayHarness, offset: float) -> None:
    relay.relay.admission.clock = lambda: time.time() + offset


def move_token_clock(relay: RelayHarness, seconds: float) -> None:
    """From now on the relay checks tokens ``seconds`` later than the real time."""
    relay.call(_set_token_clock(relay, seconds))


async def _set_port_clock(relay: RelayHarness, offset: float) -> None:
    relay.relay.tcp_ports.clock = lambda: time.monotonic() + offset


def move_port_clock(relay: RelayHarness, seconds: float) -> None:
    """From now on the relay's TCP ports see time ``seconds`` later."""
    relay.call(_set_port_clock(relay, seconds))


def frames_until_close(control: RawConnection) -> list[dict[str, Any]]:
    """Every frame the relay sends before it closes, pings answered, dials left out."""
    frames = []
    while (message := control.receive()) is not None:
        if message["type"] == "ping":
            control.send(type="pong", seq=message["seq"])
        elif message["type"] != "dial":
            frames.append(message)
    return frames


def lose(relay: RelayHarness, token: str, session: RawSession) -> None:
    """Drop a raw session's control connection and wait for the relay to notice."""
    session.control.close()
    wait_until(lambda: not sessions_of(relay, token), "the lost session to end")


def payload_of(token: str) -> dict[str, Any]:
    body = token.split(".")[1]
    payload: dict[str, Any] = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return payload


# -- 5: a token is checked for the whole life of its session --------------------------


def test_an_expired_token_opens_nothing_more_and_its_session_ends(own_relay: RelayHarness) -> None:
    relay = own_relay
    token = relay.mint("short-lived", ttl_seconds=60)
    with raw_session(relay, token) as session:
        assert session.open(1)["type"] == "opened"
        move_token_clock(relay, 60 + tokens.DEFAULT_LEEWAY_SECONDS)
        session.control.send(type="open", id=2, local_port=9, tcp=False, h2=False)
        frames = frames_until_close(session.control)
    # Whichever comes first, the open or the relay's sweep: no tunnel, and the
    # session ends with token-expired.
    assert not [f for f in frames if f["type"] == "opened"], frames
    assert all(f["type"] == "error" and f["code"] == "token-expired" for f in frames), frames
    assert frames[-1].get("id") is None
    assert frames[-1]["message"].startswith("token expired at "), frames
    assert not sessions_of(relay, token)


def test_the_sweep_ends_a_live_session_whose_token_expired(
    own_relay: RelayHarness, caplog: pytest.LogCaptureFixture
) -> None:
    relay = own_relay
    caplog.set_level(logging.INFO, logger="burrow.relay")
    doomed, other = relay.mint("doomed", ttl_seconds=60), relay.mint("other", ttl_seconds=None)
    with (
        http_server(marker="doomed-page") as doomed_server,
        http_server(marker="other-page") as other_server,
        burrow.forward(other_server.port, client=relay.client(other)) as other_tunnel,
    ):
        opening = burrow.forward(doomed_server.port, client=relay.client(doomed))
        with opening as tunnel:
            assert_serves(relay, tunnel, "doomed-page")
            agent = opening._session
            assert isinstance(agent, AgentSession)
            move_token_clock(relay, 60 + tokens.DEFAULT_LEEWAY_SECONDS)
            # No open, no hello: the relay's own sweep finds it.
            wait_until(lambda: not sessions_of(relay, doomed), "the session to end", REVOKED_WITHIN)
            wait_until(lambda: agent.closed, "the agent to give up")
            assert isinstance(agent._fatal, AuthError), agent._fatal
            assert "token expired at" in str(agent._fatal)
            assert not agent._fatal.retryable
            assert_not_found(relay, tunnel)
            assert_serves(relay, other_tunnel, "other-page")
    ended = relay_logs(caplog, logging.WARNING, "ended: token expired at")
    assert ended and "doomed" in ended[0], ended
    # The agent knew not to come back with it.
    assert not relay_logs(caplog, logging.WARNING, "refused: token expired")


def test_a_token_names_the_relays_it_is_for(relay: RelayHarness) -> None:
    here = relay.mint("fleet", relays=["r9.example.com", DOMAIN])
    with (
        http_server(marker="fleet-page") as server,
        burrow.forward(server.port, client=relay.client(here)) as tunnel,
    ):
        assert_serves(relay, tunnel, "fleet-page")
    elsewhere = relay.mint("fleet", relays=["r9.example.com"])
    with (  # noqa: SIM117
        pytest.raises(AuthError, match=f"token is for r9.example.com only, not {DOMAIN}"),
    ):
        with burrow.forward(8000, client=relay.client(elsewhere)):
            pass


def test_a_token_before_its_not_before_is_refused(relay: RelayHarness) -> None:
    later = relay.mint("later", not_before=int(time.time()) + 3600)
    with pytest.raises(AuthError, match="token is not valid yet: not before "):  # noqa: SIM117
        with burrow.forward(8000, client=relay.client(later)):
            pass


RELAYS = ("--relay", "R1.Example.com.", "--relay", "r2.example.com")


def test_token_mint_names_relays(tmp_path: Path) -> None:
    key = tmp_path / "signing.pem"
    tokens.write_signing_key(tokens.generate_signing_key(), key)
    out = subprocess.run(
        [*BURROW, "token", "mint", "--key", str(key), *RELAYS],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert payload_of(out.stdout.strip())["aud"] == ["r1.example.com", "r2.example.com"]
    out = subprocess.run(
        [*BURROW, "token", "mint", "--key", str(key), "--relay", "not a relay"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "not a relay" in out.stderr


# -- 7: a lost session's TCP port is its token's for a while ---------------------------


@pytest.fixture
def one_port_relay(tmp_path: Path) -> Iterator[RelayHarness]:
    """A relay whose raw TCP range is a single port: who gets it is never luck."""
    port = free_port()
    with run_relay(tmp_path / "relay", tcp_ports=(port, port)) as relay:
        yield relay


def test_a_lost_sessions_tcp_port_is_not_given_to_another_tenant(
    one_port_relay: RelayHarness,
) -> None:
    relay = one_port_relay
    port = relay.relay.config.tcp_ports[0]
    alice, bob = relay.mint("alice"), relay.mint("bob")
    with raw_session(relay, alice) as session:
        first = session.open(1, tcp=True)
        assert first["tcp_port"] == port
        lose(relay, alice, session)
    with raw_session(relay, bob) as session:
        refused = session.open(1, tcp=True)
        assert (refused["type"], refused["code"]) == ("error", "tcp-exhausted"), refused
    with raw_session(relay, alice) as session:
        back = session.open(1, tcp=True, claim=first["claim"])
    assert back["type"] == "opened", back
    assert (back["host"], back["tcp_port"]) == (first["host"], port)


def test_when_only_the_port_cannot_come_back_the_name_does(one_port_relay: RelayHarness) -> None:
    relay = one_port_relay
    port = relay.relay.config.tcp_ports[0]
    alice, bob = relay.mint("alice"), relay.mint("bob")
    with raw_session(relay, alice) as session:
        first = session.open(1, tcp=True)
        lose(relay, alice, session)
    move_port_clock(relay, PORT_GRACE_SECONDS)  # alice stayed away too long
    with raw_session(relay, bob) as bob_session:
        assert bob_session.open(1, tcp=True)["tcp_port"] == port
        with raw_session(relay, alice) as session:
            back = session.open(1, tcp=True, claim=first["claim"])
            assert back["type"] == "opened", back
            assert back["host"] == first["host"]
            assert back.get("tcp_port") is None and back.get("tcp_host") is None
            assert first["host"].split(".")[0] in relay.relay.routes


async def _lose_and_take_port(relay: RelayHarness, session_id: str, port: int) -> socket.socket:
    """End a session, then hold its TCP port from outside the relay before the agent is back."""
    relay.relay.registry.sessions[session_id].close()
    deadline = time.monotonic() + TIMEOUT
    while True:
        blocker = socket.socket()
        try:
            blocker.bind(("127.0.0.1", port))
        except OSError as exc:
            blocker.close()
            # The relay's listener closes on the loop's next turn.
            assert exc.errno == errno.EADDRINUSE and time.monotonic() < deadline, exc
            await asyncio.sleep(0.001)
            continue
        blocker.listen()
        return blocker


def test_an_agent_keeps_its_https_name_when_its_tcp_port_is_gone(
    one_port_relay: RelayHarness, caplog: pytest.LogCaptureFixture
) -> None:
    relay = one_port_relay
    caplog.set_level(logging.INFO)
    port = relay.relay.config.tcp_ports[0]
    token = relay.mint("alice")
    with http_server(marker="alice-page") as server:
        opening = burrow.forward(server.port, unencrypted=True, client=relay.client(token))
        with opening as tunnel:
            assert tunnel.unencrypted_port == port
            agent = opening._session
            assert isinstance(agent, AgentSession)
            ((old_session, _),) = sessions_of(relay, token)
            blocker = relay.call(_lose_and_take_port(relay, old_session, port))
            try:
                wait_until(lambda: agent.reconnects == 1, "the agent to come back")
                wait_until(
                    lambda: "is back, but not its TCP port" in caplog.text, "the agent's warning"
                )
                assert_serves(relay, tunnel, "alice-page")
                assert any(
                    f"TCP port {port}: it has none now" in r.getMessage()
                    for r in caplog.records
                    if r.name == "burrow.agent"
                ), caplog.text
            finally:
                blocker.close()


# -- 11: a claim that is not ASCII ----------------------------------------------------


@pytest.mark.parametrize(
    "claim",
    [
        "é" * 14 + ".0." + "0" * 32,
        "abcdefghijklmn.0." + "é" * 32,
        "abcdefghijklmn.٣." + "0" * 32,
        "abcdefghijklmn.0.\x00",
        "abcdefghijklmn.0." + "\udcff" * 32,  # not even Unicode: a protocol error
    ],
)
def test_a_claim_that_is_not_ascii_gets_error_claim(
    own_relay: RelayHarness, caplog: pytest.LogCaptureFixture, claim: str
) -> None:
    relay = own_relay
    caplog.set_level(logging.DEBUG)
    with raw_session(relay, relay.mint("claims")) as session:
        refused = session.open(1, claim=claim)
        if claim.endswith("\udcff"):
            assert (refused["type"], refused["code"]) == ("error", "protocol"), refused
            assert refused["message"] == "open.claim is not valid Unicode"
            assert session.control.receive() is None
        else:
            assert (refused["type"], refused["id"], refused["code"]) == ("error", 1, "claim")
            # The session goes on.
            assert session.open(2)["type"] == "opened"
    problems = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not problems, [r.getMessage() for r in problems]
    assert "Task exception was never retrieved" not in caplog.text
    assert "Traceback" not in caplog.text


# -- 12: a token at its limit takes its own names back --------------------------------


def test_a_token_at_its_limit_takes_its_own_name_back(relay: RelayHarness) -> None:
    token = relay.mint("one-tunnel", max_tunnels=1)
    with raw_session(relay, token) as old:
        first = old.open(1)
        assert first["type"] == "opened"
        # The old session has not timed out yet; a new one of the same token reclaims.
        with raw_session(relay, token) as new:
            back = new.open(1, claim=first["claim"])
            assert back["type"] == "opened", back
            assert back["host"] == first["host"]
            # Still one tunnel: a new name is over the limit.
            over = new.open(2)
            assert (over["type"], over["code"]) == ("error", "limit"), over


# -- 13: what a peer says cannot forge a log line -------------------------------------


FORGED = "burrow/1\n2026-12-01 12:00:00,000 WARNING burrow.relay: session x for admin"


def test_peer_strings_cannot_forge_relay_log_lines(
    relay: RelayHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="burrow.relay")
    token = relay.mint("logs")
    with RawConnection(relay, protocol.ALPN_CONTROL) as control:
        control.send(
            type="hello",
            version=protocol.PROTOCOL_VERSION,
            token=token,
            agent=FORGED + "\r\x1b[2J\u202e" + "A" * 5000,
            workload="w\r\nx",
        )
        assert control.reply("welcome")["type"] == "welcome"
    with RawConnection(relay, protocol.ALPN_CONTROL) as control:
        control.send(type="hel\nlo", version=2, token="x\ny", agent=FORGED)
        frames_until_close(control)
    with RawConnection(relay, protocol.ALPN_CONTROL) as control:
        control.send(type="hello", version=protocol.PROTOCOL_VERSION, token="a\n.b.c", agent=FORGED)
        frames_until_close(control)
    wait_until(
        lambda: relay_logs(caplog, logging.INFO, "no valid first frame"), "the bad hello's log"
    )
    lines = [r.getMessage() for r in caplog.records if r.name == "burrow.relay"]
    assert any("burrow/1\\n2026-12-01 12:00:00,000 WARNING" in line for line in lines), lines
    for line in lines:
        assert line.isprintable(), line
        assert len(line) < 2000, line[:200]


# -- 14: one normal form of a server name, whichever worker reads it ---------------------


def visit(port: int, ca: str, server_name: str, host: str) -> str:
    """GET /id with ``server_name`` as SNI: the status and body, or ``refused``."""
    context = ssl.create_default_context(cafile=ca)
    context.check_hostname = False  # SNI with two trailing dots is no hostname to check
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw:
        try:
            # bytes: Python would refuse to IDNA-encode such a name as SNI.
            sock = context.wrap_socket(raw, server_hostname=server_name.encode())
        except ssl.SSLError as exc:
            return f"refused ({exc.reason})"
        with sock:
            sock.sendall(f"GET /id HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            reply = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    reply += chunk
    head, _, body = reply.decode(errors="replace").partition("\r\n\r\n")
    return f"{head.split(' ')[1] if head else '-'} {body.strip()}"


def test_trailing_dots_route_the_same_whichever_worker_accepts(tmp_path: Path) -> None:
    with (
        dev_workers(tmp_path) as relay,
        http_server(files={"id": b"dots\n"}) as server,
        burrow.forward(server.port, client=relay.client("dots")) as tunnel,
    ):
        ca = relay.settings["BURROW_CA"]
        one = collections.Counter(
            visit(tunnel.port, ca, tunnel.host + ".", tunnel.host) for _ in range(10)
        )
        assert one == {"200 dots": 10}
        two = collections.Counter(
            visit(tunnel.port, ca, tunnel.host + "..", tunnel.host) for _ in range(10)
        )
        assert two == {"refused (TLSV1_UNRECOGNIZED_NAME)": 10}, two
