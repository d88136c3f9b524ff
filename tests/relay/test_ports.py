"""Tests for burrow.relay.ports: which TCP ports are tried, with binding faked."""

from __future__ import annotations

import itertools

import pytest

from burrow.relay.ports import PORT_GRACE_SECONDS, TCP_PORT_ATTEMPTS, Listener, TcpPorts


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
    return TcpPorts(
        ["127.0.0.1", "::1"], (20000, 29999), choose=lambda low, high: next(picks) - 20000
    )


def test_candidates_are_random_picks_of_the_range() -> None:
    seen: list[tuple[int, int]] = []

    def choose(low: int, high: int) -> int:
        seen.append((low, high))
        return len(seen)

    ports = TcpPorts(["0.0.0.0"], (20000, 29999), choose=choose)
    first = list(itertools.islice(ports.candidates(), TCP_PORT_ATTEMPTS))
    assert first == [20000 + i for i in range(1, TCP_PORT_ATTEMPTS + 1)]
    # The choice is an offset into the range (into this worker's share of it).
    assert seen == [(0, 9999)] * TCP_PORT_ATTEMPTS


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


async def test_a_full_range_is_an_oserror_after_every_port_was_tried_once() -> None:
    host = FakeHost(taken={("*", 21000)})
    ports = TcpPorts(["127.0.0.1"], (21000, 21000), attempts=5)
    with pytest.raises(OSError, match=r"^no free port found in the TCP range 21000-21000: "):
        await ports.bind(host.bind)
    assert host.tried == [("127.0.0.1", 21000)]


async def test_a_wanted_port_that_is_taken_is_tried_once() -> None:
    host = FakeHost(taken={("*", 21000)})
    with pytest.raises(OSError, match=r"^TCP port 21000 is not free: "):
        await sequence(22000).bind(host.bind, 21000)
    assert host.tried == [("127.0.0.1", 21000)]


# -- a freed port: kept for its token, then the least recently freed first -------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def small_range(clock: Clock, high: int = 21001, **kw: object) -> TcpPorts:
    """127.0.0.1, ports 21000 to ``high``, random picks always the lowest offset."""
    return TcpPorts(
        ["127.0.0.1"],
        (21000, high),
        choose=lambda low, _: low,
        clock=clock,
        **kw,  # type: ignore[arg-type]
    )


async def test_a_freed_port_is_kept_for_its_token_during_the_grace_period() -> None:
    clock, host = Clock(), FakeHost()
    ports = small_range(clock)
    assert (await ports.bind(host.bind, owner="alice"))[0] == 21000
    ports.release(21000, "alice")
    assert ports.held_for(21000) == "alice"
    # Another tenant gets a port never handed out, and then nothing.
    assert (await ports.bind(host.bind, owner="bob"))[0] == 21001
    with pytest.raises(OSError, match=r"kept for 600s for the tunnel that had it"):
        await ports.bind(host.bind, owner="carol")
    with pytest.raises(OSError, match=r"^TCP port 21000 is not free: kept for its last token$"):
        await ports.bind(host.bind, 21000, owner="bob")
    with pytest.raises(OSError, match=r"^TCP port 21001 is not free: another tunnel has it$"):
        await ports.bind(host.bind, 21001, owner="bob")
    clock.now += PORT_GRACE_SECONDS - 1
    # Its token takes it back with its claim.
    assert (await ports.bind(host.bind, 21000, owner="alice"))[0] == 21000
    assert ports.held_for(21000) is None
    assert ports.in_use == {21000, 21001}


async def test_after_the_grace_period_a_freed_port_goes_to_anyone() -> None:
    clock, host = Clock(), FakeHost()
    ports = small_range(clock, high=21000)
    await ports.bind(host.bind, owner="alice")
    ports.release(21000, "alice")
    clock.now += PORT_GRACE_SECONDS
    assert ports.held_for(21000) is None
    assert (await ports.bind(host.bind, owner="bob"))[0] == 21000


async def test_the_least_recently_freed_port_goes_first() -> None:
    clock, host = Clock(), FakeHost()
    ports = small_range(clock, high=21002)
    for owner in ("a", "b", "c"):
        await ports.bind(host.bind, owner=owner)
    assert ports.in_use == {21000, 21001, 21002}
    for port in (21002, 21000, 21001):
        ports.release(port, "x")
        clock.now += 1
    assert list(ports.candidates(owner="y")) == []
    clock.now += PORT_GRACE_SECONDS - 2  # 21002 and 21000 are out of their grace, 21001 not
    assert list(ports.candidates(owner="y")) == [21002, 21000]
    clock.now += 1
    assert list(ports.candidates(owner="y")) == [21002, 21000, 21001]


async def test_ports_never_handed_out_go_before_freed_ones() -> None:
    clock, host = Clock(), FakeHost()
    ports = small_range(clock)
    await ports.bind(host.bind, owner="a")
    ports.release(21000, "a")
    clock.now += PORT_GRACE_SECONDS
    assert list(ports.candidates(owner="b")) == [21001, 21000]


def test_releasing_a_port_not_in_use_changes_nothing() -> None:
    clock = Clock()
    ports = small_range(clock)
    ports.release(21000, "a")
    assert ports.held_for(21000) is None
    assert list(ports.candidates(owner="b")) == [21000, 21001]


def test_after_the_random_picks_every_port_left_is_tried_once() -> None:
    ports = small_range(Clock(), high=21004, attempts=3)
    assert list(ports.candidates()) == [21000, 21001, 21002, 21003, 21004]


def test_each_worker_hands_out_its_own_share_of_the_range() -> None:
    picks = itertools.count()
    shares = [
        TcpPorts(["127.0.0.1"], (20000, 20006), choose=lambda low, high: next(picks) % (high + 1),
                 share=(index, 2))
        for index in range(2)
    ]  # fmt: skip
    assert set(shares[0].candidates()) == {20000, 20002, 20004, 20006}
    assert set(shares[1].candidates()) == {20001, 20003, 20005}


async def test_a_token_keeps_no_more_ports_than_its_tunnel_limit() -> None:
    # Opening and closing TCP tunnels in a loop must not hold the whole range for a token.
    clock, host = Clock(), FakeHost()
    ports = small_range(clock, high=21003)
    for _ in range(4):
        port, _ = await ports.bind(host.bind, owner="alice")
        ports.release(port, "alice", keep=1)
        clock.now += 1
    assert [ports.held_for(port) for port in range(21000, 21004)] == [None, None, None, "alice"]
    # Bob gets the longest freed; alice's last is still hers alone.
    assert list(ports.candidates(owner="bob")) == [21000, 21001, 21002]
    assert (await ports.bind(host.bind, owner="bob"))[0] == 21000
    assert (await ports.bind(host.bind, 21003, owner="alice"))[0] == 21003
