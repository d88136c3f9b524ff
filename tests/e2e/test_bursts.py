"""Bursts of visitors through one tunnel: every visitor is answered, the relay keeps
ready what a burst took, and the agent's data connections resume one TLS session.

A real relay on loopback (harness.run_relay), a real agent (burrow.forward) and a
threaded echo server; the visitors are asyncio connections opened all at once.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path

import pytest
from backends import tcp_echo_server
from e2e.test_relay_abuse import session_of
from harness import RelayHarness, run_relay, wait_until

import burrow
from burrow import Tunnel
from burrow.relay.config import POOL_SIZE
from burrow.relay.session import RelaySession

BURST = 200
TIMEOUT = 30.0


async def visit(relay: RelayHarness, tunnel: Tunnel, tcp: bool, i: int) -> bytes:
    """One visitor: connect, send a line, read its echo."""
    if tcp:
        assert tunnel.unencrypted_port is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", tunnel.unencrypted_port)
    else:
        context = ssl.create_default_context(cafile=str(relay.ca))
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", relay.port, ssl=context, server_hostname=tunnel.host
        )
    try:
        line = f"visitor {i:04d}\n".encode()
        writer.write(line)
        return await reader.readexactly(len(line))
    finally:
        writer.close()


def burst(relay: RelayHarness, tunnel: Tunnel, tcp: bool) -> list[bytes | BaseException]:
    async def all_at_once() -> list[bytes | BaseException]:
        visits = (visit(relay, tunnel, tcp, i) for i in range(BURST))
        return await asyncio.wait_for(asyncio.gather(*visits, return_exceptions=True), TIMEOUT)

    return asyncio.run(all_at_once())


def pool_of(relay: RelayHarness, session: RelaySession) -> tuple[int, int, list[bool]]:
    """Idle data connections at the relay, how many it wants, and whether each
    resumed a TLS session."""

    async def look() -> tuple[int, int, list[bool]]:
        channels = list(session._pool)
        wanted = session._reserve.wanted(time.monotonic())
        return len(channels), wanted, [c.stream.ssl_object.session_reused for c in channels]

    return relay.call(look())


def refilled(relay: RelayHarness, session: RelaySession) -> bool:
    pooled, wanted, _ = pool_of(relay, session)
    return pooled >= wanted


@pytest.mark.parametrize("tcp", [True, False], ids=["raw-tcp", "https"])
def test_a_burst_of_visitors_is_answered_and_kept_ready_for(tmp_path: Path, tcp: bool) -> None:
    with run_relay(tmp_path) as relay, tcp_echo_server() as server:
        token = relay.mint("bursts")
        with burrow.forward(server.port, unencrypted=tcp, client=relay.client(token)) as tunnel:
            session = session_of(relay, token)
            wait_until(lambda: pool_of(relay, session)[0] == POOL_SIZE, "the pool to fill")
            expected = [f"visitor {i:04d}\n".encode() for i in range(BURST)]
            assert burst(relay, tunnel, tcp) == expected
            # The relay keeps ready what the burst took (the visitors of its last
            # second: all of them, unless this machine is slow), each connection a
            # resumed TLS session.
            wait_until(lambda: refilled(relay, session), "the pool to refill")
            pooled, _, resumed = pool_of(relay, session)
            assert pooled > POOL_SIZE
            assert all(resumed), "a data connection made a full TLS handshake"
            assert burst(relay, tunnel, tcp) == expected
