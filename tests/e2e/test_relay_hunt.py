"""What a second look at the relay found, each as an attacker would try it: a real
relay on loopback, tenants that speak the protocol by hand (two tokens), and a
check that the other tenant is still served.
"""

from __future__ import annotations

import socket
from pathlib import Path

from e2e.test_relay_security import raw_session
from harness import RelayHarness, run_relay

from burrow import tokens

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
