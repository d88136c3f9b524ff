"""Tests for burrow.relay.ports: which TCP ports are tried, with binding faked."""

from __future__ import annotations

import itertools

import pytest

from burrow.relay.ports import TCP_PORT_ATTEMPTS, Listener, TcpPorts


class FakeListener:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeHost:
    """Binds like loop.create_server, refusing ports in ``taken`` (per host, or for all)."""

    def __init__(self, taken: set[tuple[str, int]] | None = None) -> None:
        self.taken = taken or set()
        self.tried: list[tuple[str, int]] = []
        self.listeners: list[FakeListener] = []

    async def bind(self, host: str, port: int) -> Listener:
        self.tried.append((host, port))
        if (host, port) in self.taken or ("*", port) in self.taken:
            raise OSError(98, f"[Errno 98] address already in use: {host}:{port}")
        listener = FakeListener(host, port)
        self.listeners.append(listener)
        return listener


def sequence(*ports: int) -> TcpPorts:
    """A TcpPorts whose random choice yields ``ports`` in turn, over 127.0.0.1 and ::1."""
    picks = itertools.chain(ports, itertools.repeat(ports[-1]))
    return TcpPorts(["127.0.0.1", "::1"], (20000, 29999), choose=lambda low, high: next(picks))


def test_candidates_are_random_picks_of_the_range() -> None:
    seen: list[tuple[int, int]] = []

    def choose(low: int, high: int) -> int:
        seen.append((low, high))
        return low + len(seen)

    ports = TcpPorts(["0.0.0.0"], (20000, 29999), choose=choose)
    assert list(ports.candidates()) == [20000 + i for i in range(1, TCP_PORT_ATTEMPTS + 1)]
    assert seen == [(20000, 29999)] * TCP_PORT_ATTEMPTS


def test_a_wanted_port_is_the_only_candidate() -> None:
    ports = TcpPorts(["0.0.0.0"], (20000, 29999), choose=lambda low, high: pytest.fail("chose"))
    assert list(ports.candidates(20500)) == [20500]


def test_the_default_choice_stays_in_the_range() -> None:
    ports = TcpPorts(["0.0.0.0"], (20000, 20002))
    assert set(ports.candidates()) <= {20000, 20001, 20002}


async def test_a_free_port_is_bound_on_every_host() -> None:
    host = FakeHost()
    port, listeners = await sequence(21000).bind(host.bind)
    assert port == 21000
    assert [(lst.host, lst.port) for lst in host.listeners] == [
        ("127.0.0.1", 21000),
        ("::1", 21000),
    ]
    assert listeners == host.listeners


async def test_a_port_taken_on_one_host_is_released_on_the_others() -> None:
    host = FakeHost(taken={("::1", 21000)})
    port, _ = await sequence(21000, 21001).bind(host.bind)
    assert port == 21001
    assert host.tried == [
        ("127.0.0.1", 21000),
        ("::1", 21000),
        ("127.0.0.1", 21001),
        ("::1", 21001),
    ]
    first = host.listeners[0]
    assert (first.port, first.closed) == (21000, True)
    assert all(not lst.closed for lst in host.listeners[1:])


async def test_a_full_range_is_an_oserror_after_every_attempt() -> None:
    host = FakeHost(taken={("*", 21000)})
    ports = TcpPorts(["127.0.0.1"], (21000, 21000), attempts=5)
    with pytest.raises(OSError, match=r"^no free port found in the TCP range 21000-21000: "):
        await ports.bind(host.bind)
    assert host.tried == [("127.0.0.1", 21000)] * 5


async def test_a_wanted_port_that_is_taken_is_tried_once() -> None:
    host = FakeHost(taken={("*", 21000)})
    with pytest.raises(OSError, match=r"^TCP port 21000 is not free: "):
        await sequence(22000).bind(host.bind, 21000)
    assert host.tried == [("127.0.0.1", 21000)]
