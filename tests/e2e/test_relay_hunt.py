"""What a second look at the relay found, each as an attacker would try it: a real
relay on loopback, tenants that speak the protocol by hand (two tokens), and a
check that the other tenant is still served.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import pytest
from backends import http_server
from e2e.test_relay_security import TIMEOUT, assert_serves, raw_session
from harness import DOMAIN, RelayHarness, run_relay

import burrow
from burrow import tokens
from burrow.relay.server import FIRST_FRAME_TIMEOUT
from burrow.wire import protocol

# A small TCP range, so that a token could hold all of it in a few round trips.
RANGE_SIZE = 16


def free_range(size: int) -> tuple[int, int]:
    """``size`` consecutive ports free on 127.0.0.1, below the ephemeral range."""
    for low in range(30000, 32768 - size, size):
        socks: list[socket.socket] = []
        try:
            for port in range(low, low + size):
                sock = socket.socket()
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
        return low, low + size - 1
    raise AssertionError(f"no {size} consecutive free ports")


def test_opening_and_closing_tcp_tunnels_cannot_hold_the_tcp_range(tmp_path: Path) -> None:
    """A token may hold one tunnel; opening and closing TCP tunnels in a loop used to
    keep every port it touched for it (PORT_GRACE_SECONDS, 10 minutes), so that
    16 round trips left the range empty for everyone, the churner included.
    Now a token keeps no more freed ports than its tunnel limit."""
    with run_relay(tmp_path / "relay", tcp_ports=free_range(RANGE_SIZE)) as relay:
        churner = relay.mint("churner", max_tunnels=1)
        seen: set[int] = set()
        with raw_session(relay, churner) as session:
            for tunnel_id in range(1, 3 * RANGE_SIZE):
                opened = session.open(tunnel_id, tcp=True)
                assert opened["type"] == "opened", (tunnel_id, opened)
                seen.add(opened["tcp_port"])
                session.control.send(type="close", id=tunnel_id)
                assert session.control.reply("closed", "error")["type"] == "closed"
            kept = kept_for(relay, churner)
        assert len(seen) == RANGE_SIZE  # it went round the whole range
        assert kept <= 1, f"{kept} ports kept for a token that may hold 1 tunnel"
        with raw_session(relay, relay.mint("other")) as other:
            for tunnel_id in range(1, RANGE_SIZE):  # every port but the one kept
                opened = other.open(tunnel_id, tcp=True)
                assert opened["type"] == "opened", (tunnel_id, opened)


def kept_for(relay: RelayHarness, token: str) -> int:
    """How many ports the relay keeps for ``token`` (freed, within their grace)."""
    token_id = tokens.token_id_of(token)
    ports = relay.relay.tcp_ports

    async def count() -> int:
        return sum(ports.held_for(port) == token_id for port in range(ports.low, ports.high + 1))

    kept: int = relay.call(count())
    return kept


def test_closing_and_reopening_a_claimed_name_is_rate_limited(tmp_path: Path) -> None:
    """New tunnels count against the token's creation rate; names taken back with a
    claim did not count at all, so a token closed and reopened one name about
    3,700 times a second, each an unpublish, a publish and two lines in the
    relay's log. Now a claim is free for a burst of twice the token's tunnel
    limit (a reconnect, and another), then held to the creation rate."""
    with run_relay(
        tmp_path / "relay", tunnel_creations_per_second=1.0, tunnel_creation_burst=2
    ) as relay:
        churner = relay.mint("churner", max_tunnels=1)
        with raw_session(relay, churner) as session:
            opened = session.open(1)
            claim = opened["claim"]
            reopened = 0
            for tunnel_id in range(2, 200):
                session.control.send(type="close", id=tunnel_id - 1)
                assert session.control.reply("closed", "error")["type"] == "closed"
                answer = session.open(tunnel_id, claim=claim)
                if answer["type"] != "opened":
                    assert answer["code"] == "limit", answer
                    assert "takes names back too fast" in answer["message"]
                    break
                assert answer["host"] == opened["host"]
                reopened += 1
            # The burst (2, or twice the token's limit of 1) and what one second refills.
            assert reopened <= 4, f"{reopened} names taken back in a loop"
        # A reconnecting agent still takes all its names back at once.
        owner = relay.mint("owner", max_tunnels=2)
        with raw_session(relay, owner) as lost:
            claims = [lost.open(n)["claim"] for n in (1, 2)]  # the burst: 2
        with raw_session(relay, owner) as back:
            for n, claim in enumerate(claims, 1):
                assert back.open(n, claim=claim)["type"] == "opened"


# Agent connections from one address that finish TLS and then say nothing.
SILENT_AGENTS = 40
PER_SOURCE = 8


@pytest.mark.parametrize("alpn", [protocol.ALPN_CONTROL, protocol.ALPN_DATA])
def test_agent_connections_that_never_speak_count_against_the_handshake_caps(
    tmp_path: Path, alpn: str
) -> None:
    """Finishing the TLS handshake took a connection off the caps on unfinished
    handshakes; with an agent's ALPN id and no first frame, anyone held it for
    FIRST_FRAME_TIMEOUT (10 s) with no cap at all: 4,000 from one address in
    4 s held 4,000 descriptors and 96 MiB of a relay process. Now such a
    connection counts as unfinished until its first frame: past the
    per-source cap, that source's oldest goes."""
    assert TIMEOUT / 2 < FIRST_FRAME_TIMEOUT  # a close seen here is the cap's, not the timeout's
    with run_relay(tmp_path / "relay", max_pending_handshakes_per_source=PER_SOURCE) as relay:
        context = ssl.create_default_context(cafile=str(relay.ca))
        context.set_alpn_protocols([alpn])
        silent: list[ssl.SSLSocket] = []
        try:
            for _ in range(SILENT_AGENTS):
                raw = socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT / 2)
                silent.append(context.wrap_socket(raw, server_hostname=DOMAIN))
            # All within half the first-frame timeout of the flood's start.
            deadline = time.monotonic() + TIMEOUT / 2
            closed = sum(
                closed_by_relay(sock, deadline) for sock in silent[: SILENT_AGENTS - PER_SOURCE]
            )
            assert closed == SILENT_AGENTS - PER_SOURCE, f"{closed} of the oldest closed"
            # A real agent from the same address still gets in, and serves.
            with (
                http_server(marker="hunt-served") as server,
                burrow.forward(server.port, client=relay.client()) as tunnel,
            ):
                assert_serves(relay, tunnel, "hunt-served")
        finally:
            for sock in silent:
                sock.close()


def closed_by_relay(sock: ssl.SSLSocket, deadline: float) -> bool:
    """Whether the relay closes ``sock`` before ``deadline`` (monotonic) without a word."""
    sock.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        while True:
            if not sock.recv(4096):
                return True
    except (ConnectionResetError, ssl.SSLError):
        return True
    except TimeoutError:
        return False
