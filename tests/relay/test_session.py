"""Tests for burrow.relay.session: a conversation with one agent, in memory.

The relay session's control connection runs over a fake stream; the test
plays the agent with its own :class:`protocol.Connection`. Each test reads
as "the agent sends this, the relay answers that, and its tables now hold".
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from burrow.net.channel import Channel
from burrow.net.stream import Chunk, Receiver
from burrow.relay.admission import Admission
from burrow.relay.claims import ClaimSigner
from burrow.relay.config import RelayConfig
from burrow.relay.metrics import RelayMetrics
from burrow.relay.pool import MAX_DIAL_COUNT, MAX_RESERVE, Reserve
from burrow.relay.quota import TokenQuotas
from burrow.relay.registry import Registry, RelayTunnel
from burrow.relay.session import RelaySession
from burrow.tokens import TokenGrant, generate_signing_key
from burrow.wire import protocol

DOMAIN = "r1.example.com"
GRANT = TokenGrant(subject="ci", token_id="tok1", issued_at=0, expires_at=None, max_tunnels=None)


class FakeStream:
    """What a channel needs of a stream, in memory: writes are kept, reads are fed."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.wrote = asyncio.Event()
        self.receiver: Receiver | None = None
        self.closed = False
        self.peername = "127.0.0.1:50000"
        self.unsent = 0  # bytes the agent has not read yet

    def set_receiver(self, receiver: Receiver) -> None:
        self.receiver = receiver

    def write(self, data: Chunk) -> None:
        assert not self.closed, "written after close"
        self.written += data
        self.wrote.set()

    def feed(self, data: bytes) -> None:
        assert self.receiver is not None
        self.receiver.on_data(self, data)  # type: ignore[arg-type]

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.receiver is not None:
                self.receiver.on_close(self, None)  # type: ignore[arg-type]

    close_lingering = abort = close


@dataclass
class FakeRelay:
    """The relay as a session sees it (burrow.relay.session.RelayServices)."""

    registry: Registry
    admission: Admission
    claims: ClaimSigner
    config: RelayConfig
    public_port: int = 443
    tcp_host: str = DOMAIN
    free_tcp_port: int | None = 20001
    tcp_asked: list[int | None] = field(default_factory=list)
    metrics: RelayMetrics = field(default_factory=RelayMetrics)

    async def open_tcp_port(self, tunnel: RelayTunnel, port: int | None = None) -> None:
        self.tcp_asked.append(port)
        if self.free_tcp_port is None:
            raise OSError("no free port found in the TCP range 20000-29999: taken")
        tunnel.tcp_port = port or self.free_tcp_port


def new_relay() -> FakeRelay:
    config = RelayConfig(
        domain=DOMAIN,
        cert=Path("unused"),
        key=Path("unused"),
        public_key=Path("unused"),
        heartbeat=60,
    )
    quotas = TokenQuotas(100, 100.0, 100)
    claims = ClaimSigner(b"relay key")
    registry = Registry(DOMAIN, quotas)
    admission = Admission(config, generate_signing_key().public_key(), quotas, claims)
    return FakeRelay(registry, admission, claims, config)


class Agent:
    """The agent's end of the control connection, its session running at the relay."""

    def __init__(self, relay: FakeRelay) -> None:
        self.relay = relay
        self.stream = FakeStream()
        self.connection = protocol.Connection(protocol.Kind.CONTROL, protocol.Role.AGENT)
        self._read = 0

    @classmethod
    async def connect(cls, relay: FakeRelay, workload: str | None = "w1") -> Agent:
        """What the server does before a session runs: hello in, welcome out."""
        agent = cls(relay)
        channel = Channel(
            agent.stream,  # type: ignore[arg-type]
            protocol.Connection(protocol.Kind.CONTROL, protocol.Role.RELAY),
        )
        agent.send(protocol.Hello(version=protocol.PROTOCOL_VERSION, token="t", agent="test"))
        assert isinstance(await channel.receive(), protocol.Hello)
        agent.session = RelaySession(relay, channel, GRANT, workload)  # type: ignore[arg-type]
        relay.registry.add_session(agent.session)
        channel.send(
            protocol.Welcome(session=agent.session.id, key="k", domain=DOMAIN, heartbeat=60, pool=4)
        )
        assert isinstance(await agent.receive(), protocol.Welcome)
        agent.task = asyncio.get_running_loop().create_task(agent.session.run())
        return agent

    async def finish(self) -> None:
        self.session.close()
        await asyncio.wait_for(self.task, 5)

    def send(self, message: protocol.Message) -> None:
        self.stream.feed(self.connection.send(message))

    def receive_now(self) -> protocol.Message | None:
        self.connection.receive_data(bytes(self.stream.written[self._read :]))
        self._read = len(self.stream.written)
        event = self.connection.next_event()
        return None if isinstance(event, protocol.NeedData) else event

    async def receive(self) -> protocol.Message:
        while (message := self.receive_now()) is None:
            self.stream.wrote.clear()
            await asyncio.wait_for(self.stream.wrote.wait(), 5)
        return message

    async def ask(self, message: protocol.Message) -> protocol.Message:
        self.send(message)
        return await self.receive()


@pytest.fixture
def relay() -> FakeRelay:
    return new_relay()


@pytest.fixture
async def agent(relay: FakeRelay) -> AsyncIterator[Agent]:
    agent = await Agent.connect(relay)
    yield agent
    await agent.finish()


def open_(tunnel_id: int = 1, local_port: int = 8000, **kw: object) -> protocol.Open:
    fields: dict[str, object] = {"tcp": False, "h2": False}
    fields.update(kw)
    return protocol.Open(id=tunnel_id, local_port=local_port, **fields)  # type: ignore[arg-type]


async def test_an_agent_opens_a_tunnel(agent: Agent, relay: FakeRelay) -> None:
    opened = await agent.ask(open_())
    assert isinstance(opened, protocol.Opened)
    label = opened.host.removesuffix(f".{DOMAIN}")
    tunnel = relay.registry.routes[label]
    assert (tunnel.session, tunnel.id, tunnel.local_port) == (agent.session, 1, 8000)
    assert agent.session.tunnels == {1: tunnel}
    assert opened == protocol.Opened(
        id=1, host=f"{label}.{DOMAIN}", port=443, claim=relay.claims.sign(label, None, "tok1")
    )


async def test_a_raw_tcp_tunnel_gets_a_port(agent: Agent, relay: FakeRelay) -> None:
    opened = await agent.ask(open_(tcp=True))
    assert isinstance(opened, protocol.Opened)
    assert (opened.tcp_host, opened.tcp_port) == (DOMAIN, 20001)
    assert relay.tcp_asked == [None]


async def test_no_free_tcp_port_is_an_error_and_nothing_stays_published(
    agent: Agent, relay: FakeRelay
) -> None:
    relay.free_tcp_port = None
    error = await agent.ask(open_(tcp=True))
    assert error == protocol.Error(
        id=1,
        code=protocol.CODE_TCP_EXHAUSTED,
        message="no free port found in the TCP range 20000-29999: taken",
    )
    assert relay.registry.routes == {} and agent.session.tunnels == {}
    assert relay.registry.quotas.holds("tok1") == 0


async def test_a_refused_open_is_answered_with_its_id(agent: Agent) -> None:
    assert isinstance(await agent.ask(open_(1)), protocol.Opened)
    error = await agent.ask(open_(1, 8001))
    assert error == protocol.Error(
        id=1, code=protocol.CODE_BAD_REQUEST, message="tunnel id 1 is already in use"
    )


async def test_a_workload_forwards_a_port_once(agent: Agent, relay: FakeRelay) -> None:
    assert isinstance(await agent.ask(open_(1)), protocol.Opened)
    sibling = await Agent.connect(relay, workload="w1")  # another process of the workload
    try:
        assert await sibling.ask(open_(1)) == protocol.Error(
            id=1, code=protocol.CODE_PORT_FORWARDED, message="Port 8000 is already forwarded"
        )
    finally:
        await sibling.finish()


async def test_closing_a_tunnel_unpublishes_it(agent: Agent, relay: FakeRelay) -> None:
    assert isinstance(await agent.ask(open_(1)), protocol.Opened)
    assert await agent.ask(protocol.Close(id=1)) == protocol.Closed(id=1)
    assert relay.registry.routes == {} and agent.session.tunnels == {}
    assert await agent.ask(protocol.Close(id=1)) == protocol.Error(
        id=1, code=protocol.CODE_BAD_REQUEST, message="no tunnel 1 in this session"
    )


async def test_a_claim_takes_a_name_back_from_an_old_session(relay: FakeRelay) -> None:
    old = await Agent.connect(relay)
    opened = await old.ask(open_(1))
    assert isinstance(opened, protocol.Opened) and opened.claim is not None
    # The old session is lost but not yet timed out; a new one shows the claim.
    new = await Agent.connect(relay)
    again = await new.ask(open_(7, claim=opened.claim))
    assert isinstance(again, protocol.Opened)
    assert (again.host, again.claim) == (opened.host, opened.claim)
    label = opened.host.removesuffix(f".{DOMAIN}")
    assert relay.registry.routes[label].session is new.session
    assert old.session.tunnels == {}
    await old.finish()
    await new.finish()


async def test_pings_are_answered(agent: Agent) -> None:
    assert await agent.ask(protocol.Ping(seq=5)) == protocol.Pong(seq=5)


async def test_the_end_of_a_session_unpublishes_its_tunnels(agent: Agent, relay: FakeRelay) -> None:
    assert isinstance(await agent.ask(open_(1)), protocol.Opened)
    assert isinstance(await agent.ask(open_(2, 8001)), protocol.Opened)
    agent.stream.close()  # the control connection is lost
    await asyncio.wait_for(agent.task, 5)
    assert agent.session.closed
    assert relay.registry.routes == {}
    assert relay.registry.sessions == {}
    assert relay.registry.quotas.holds("tok1") == 0


async def test_leaving_tells_the_agent_to_reconnect(agent: Agent, relay: FakeRelay) -> None:
    assert isinstance(await agent.ask(open_(1)), protocol.Opened)
    (tunnel,) = agent.session.tunnels.values()
    agent.session.leave("the relay is shutting down: reconnect")
    assert agent.receive_now() == protocol.Error(
        code=protocol.CODE_SHUTTING_DOWN, message="the relay is shutting down: reconnect"
    )
    assert tunnel.closed and agent.stream.closed
    assert relay.registry.sessions == {}


# -- the data-connection pool ---------------------------------------------------------


def data_connection() -> tuple[Channel, FakeStream]:
    stream = FakeStream()
    channel = Channel(
        stream,  # type: ignore[arg-type]
        protocol.Connection(protocol.Kind.DATA, protocol.Role.RELAY),
    )
    return channel, stream


async def pooled_session(agent: Agent) -> list[FakeStream]:
    """The agent opens a tunnel and its pool (as the agent does, without a dial)."""
    assert isinstance(await agent.ask(open_()), protocol.Opened)
    streams = []
    for _ in range(agent.relay.config.pool_size):
        channel, stream = data_connection()
        agent.session.add_data_connection(channel)
        streams.append(stream)
    return streams


async def test_a_visitor_gone_before_its_bind_leaves_the_pool_as_it_was(agent: Agent) -> None:
    await pooled_session(agent)
    for _ in range(10):
        assert await agent.session.take_data_connection(1.0, lambda: False) is None
    assert len(agent.session._pool) == agent.relay.config.pool_size
    assert agent.receive_now() is None  # no dial: nothing was used up


async def test_a_connection_handed_out_is_replaced_once(agent: Agent) -> None:
    await pooled_session(agent)
    channel = await agent.session.take_data_connection(1.0, lambda: True)
    assert channel is not None
    assert agent.receive_now() == protocol.Dial(count=1)
    assert agent.receive_now() is None


async def test_the_pool_keeps_its_size_and_closes_the_rest(agent: Agent) -> None:
    streams = await pooled_session(agent)
    extra = [data_connection() for _ in range(3)]
    for channel, _ in extra:
        agent.session.add_data_connection(channel)
    assert len(agent.session._pool) == agent.relay.config.pool_size
    assert not any(stream.closed for stream in streams)
    assert all(stream.closed for _, stream in extra)


async def test_a_waiting_visitor_asks_for_what_is_not_on_its_way(agent: Agent) -> None:
    # The tunnel is open: the agent's own pool of four is on its way, so a
    # visitor who finds the pool empty asks for one more, not five.
    assert isinstance(await agent.ask(open_()), protocol.Opened)
    waiting = asyncio.ensure_future(agent.session.take_data_connection(5.0))
    assert await agent.receive() == protocol.Dial(count=1)
    channel, _ = data_connection()
    agent.session.add_data_connection(channel)
    assert await waiting is channel
    assert agent.receive_now() is None  # the other four still count as on their way


async def test_visitors_waiting_when_the_session_ends_are_let_go(agent: Agent) -> None:
    assert isinstance(await agent.ask(open_()), protocol.Opened)
    waiting = [asyncio.ensure_future(agent.session.take_data_connection(30.0)) for _ in range(3)]
    await asyncio.sleep(0)  # they wait
    agent.session.close()
    assert await asyncio.wait_for(asyncio.gather(*waiting), 5) == [None, None, None]


async def test_pooled_connections_idle_too_long_are_closed(relay: FakeRelay) -> None:
    relay.config = dataclasses.replace(relay.config, pool_idle_timeout=0.01)
    agent = await Agent.connect(relay)
    try:
        channel, stream = data_connection()
        closed = asyncio.Event()
        close = stream.close

        def close_and_tell() -> None:
            close()
            closed.set()

        stream.close = close_and_tell  # type: ignore[method-assign]
        agent.session.add_data_connection(channel)
        await asyncio.wait_for(closed.wait(), 5)
        assert not agent.session._pool
        assert agent.receive_now() is None  # not replaced until a visitor comes
    finally:
        await agent.finish()


# -- the reserve: a pool sized by the last burst ------------------------------------------


async def dials_until(agent: Agent, total: int) -> list[int]:
    """The counts of the `dial` messages the relay sends until they ask for ``total``."""
    counts: list[int] = []
    while sum(counts) < total:
        message = await agent.receive()
        assert isinstance(message, protocol.Dial), message
        counts.append(message.count)
    return counts


async def reserve_dials(agent: Agent) -> list[int]:
    """The `dial` messages that ask for the reserve, all sent at once once no visitor waits."""
    counts = await dials_until(agent, 1)
    while (message := agent.receive_now()) is not None:
        assert isinstance(message, protocol.Dial), message
        counts.append(message.count)
    return counts


async def burst_of(agent: Agent, visitors: int) -> list[asyncio.Future[Channel | None]]:
    """``visitors`` at once: each takes a pooled connection or waits for one."""
    takes = [
        asyncio.ensure_future(agent.session.take_data_connection(5.0)) for _ in range(visitors)
    ]
    await asyncio.sleep(0)  # each has taken one, or waits
    return takes


async def test_a_burst_that_waits_is_kept_ready_for_the_next_one(agent: Agent) -> None:
    await pooled_session(agent)
    takes = await burst_of(agent, 20)
    # One replacement for each of the four pooled, one for each visitor waiting.
    assert await dials_until(agent, 20) == [1] * 20
    for _ in range(20):
        agent.session.add_data_connection(data_connection()[0])
    assert all(channel is not None for channel in await asyncio.gather(*takes))
    # Once no visitor waits, the rest of the reserve: what the burst took.
    assert await reserve_dials(agent) == [16]
    for _ in range(16):
        agent.session.add_data_connection(data_connection()[0])
    assert agent.session.pooled == 20
    assert agent.receive_now() is None


async def test_the_relay_never_asks_for_more_than_its_bound(agent: Agent) -> None:
    assert isinstance(await agent.ask(open_()), protocol.Opened)  # four on their way
    takes = await burst_of(agent, 1000)
    # Every visitor waiting is asked for, one by one as each comes.
    assert await dials_until(agent, 1000) == [1] * 1000
    for _ in range(4 + 1000):
        agent.session.add_data_connection(data_connection()[0])
    assert all(channel is not None for channel in await asyncio.gather(*takes))
    # The reserve for next time stops at its cap (less a little decay since the
    # burst), each dial within what an agent dials at once.
    counts = await reserve_dials(agent)
    assert MAX_RESERVE - 8 <= 4 + sum(counts) <= MAX_RESERVE
    assert all(count <= MAX_DIAL_COUNT for count in counts)
    extra = [data_connection() for _ in range(sum(counts) + 10)]
    for channel, _ in extra:
        agent.session.add_data_connection(channel)
    assert agent.session.pooled == 4 + sum(counts)
    assert [stream.closed for _, stream in extra].count(True) == 10
    assert agent.receive_now() is None


async def test_the_pool_shrinks_back_after_a_burst(
    agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = asyncio.Event()
    close = FakeStream.close

    def close_and_tell(stream: FakeStream) -> None:
        close(stream)
        closed.set()

    monkeypatch.setattr(FakeStream, "close", close_and_tell)
    agent.session._reserve = Reserve(agent.relay.config.pool_size, half_life=0.2)
    await pooled_session(agent)
    takes = await burst_of(agent, 20)
    await dials_until(agent, 20)
    for _ in range(20):
        agent.session.add_data_connection(data_connection()[0])
    await asyncio.gather(*takes)
    for _ in range(sum(await reserve_dials(agent))):
        agent.session.add_data_connection(data_connection()[0])
    assert agent.session.pooled > agent.relay.config.pool_size
    # Halved every half-life, back to the pool's size.
    async with asyncio.timeout(5):
        while agent.session.pooled > agent.relay.config.pool_size:
            closed.clear()
            await closed.wait()
    assert agent.session.pooled == agent.relay.config.pool_size
    assert agent.receive_now() is None  # what was closed is not replaced
    assert agent.session._trim_timer is None  # nothing left to do
