"""Tests for burrow.net.channel: frames over a real stream, and the control-connection loop.

The channel under test sits on a :class:`Stream` over a socketpair (or a
loopback TCP connection where resets matter); its peer is a plain socket
that writes frames with :func:`protocol.encode` and reads them back with
:func:`protocol.decode_payload`, so the peer keeps no protocol state of its
own. Everything runs on asyncio's loop and on uvloop, which the relay and
the agent use.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
import uvloop

from burrow.exception import ConnectionError, RemoteProtocolError
from burrow.net import channel as channel_module
from burrow.net.channel import MAX_QUEUED_MESSAGES, Channel, serve_control
from burrow.net.stream import LINGER_RESET, WRITE_HIGH_WATER, Stream
from burrow.wire import protocol
from burrow.wire.protocol import (
    Close,
    Dial,
    Error,
    HeartbeatTimeout,
    Hello,
    Kind,
    Message,
    Ping,
    Pong,
    Role,
    Welcome,
)

HELLO = Hello(version=protocol.PROTOCOL_VERSION, token="t0ken", agent="test")
WELCOME = Welcome(session="s1", key="k1", domain="r1.localhost", heartbeat=15, pool=2)
# Long enough that no ping comes while a test that is not about pings runs.
QUIET = 60.0
# Short enough that a test about pings sees several.
BRISK = 0.05


Run = Callable[[Callable[[], Coroutine[Any, Any, None]]], None]

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Run:
    """Runs a test's ``main`` on a fresh loop of each kind."""

    def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            runner.run(asyncio.wait_for(main(), 30))

    return run


class WatchedStream(Stream):
    """A stream that can be awaited until its connection is lost, and counts pauses."""

    def __init__(self) -> None:
        super().__init__()
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.pauses = 0
        self.resumes = 0

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.lost.done():
            self.lost.set_result(exc)

    def pause_reading(self) -> None:
        self.pauses += 1
        super().pause_reading()

    def resume_reading(self) -> None:
        self.resumes += 1
        super().resume_reading()

    @property
    def reading(self) -> bool:
        assert self.transport is not None
        return self.transport.is_reading()


class Peer:
    """The far end: a non-blocking socket speaking frames, with no state machine."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._buffer = bytearray()

    def send(self, *messages: Message) -> None:
        """Write ``messages`` in one go (small writes: the kernel takes them whole)."""
        self.send_raw(b"".join(protocol.encode(m) for m in messages))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    async def receive(self) -> Message | None:
        """The next frame the channel wrote, or ``None`` at a clean EOF."""
        loop = asyncio.get_running_loop()
        while True:
            if len(self._buffer) >= 4:
                (length,) = struct.unpack_from("!I", self._buffer)
                if len(self._buffer) >= 4 + length:
                    payload = bytes(self._buffer[4 : 4 + length])
                    del self._buffer[: 4 + length]
                    return protocol.decode_payload(payload)
            data = await loop.sock_recv(self.sock, 65536)
            if not data:
                assert not self._buffer, f"EOF inside a frame: {bytes(self._buffer)!r}"
                return None
            self._buffer += data

    def shutdown(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
    return accepted, client


async def _channel(role: Role, *, tcp: bool = False) -> tuple[Channel, WatchedStream, Peer]:
    ours, theirs = _tcp_pair() if tcp else socket.socketpair()
    _, stream = await asyncio.get_running_loop().connect_accepted_socket(WatchedStream, ours)
    channel = Channel(stream, protocol.Connection(Kind.CONTROL, role))
    return channel, stream, Peer(theirs)


@contextlib.asynccontextmanager
async def agent() -> AsyncIterator[tuple[Channel, WatchedStream, Peer]]:
    """An agent's control channel that has sent its hello; the peer plays the relay."""
    channel, stream, peer = await _channel(Role.AGENT)
    try:
        channel.send(HELLO)
        assert await peer.receive() == HELLO
        yield channel, stream, peer
    finally:
        channel.close()
        peer.close()


async def _ready(channel: Channel, peer: Peer) -> None:
    """Take the agent's channel past the relay's welcome: both ends may ping."""
    peer.send(WELCOME)
    assert await channel.receive() == WELCOME


# -- Channel ----------------------------------------------------------------------------


def test_messages_arrive_whole_and_in_order(run: Run) -> None:
    async def main() -> None:
        async with agent() as (channel, _, peer):
            messages: list[Message] = [
                WELCOME,
                Dial(count=3),
                Ping(seq=1),
                Pong(seq=9),
                Dial(count=1),
            ]
            peer.send(*messages)
            assert [await channel.receive() for _ in messages] == messages
            assert not channel.has_pending()
            peer.shutdown()
            assert await channel.receive() is None
            assert await channel.receive() is None, "EOF is reported every time it is asked"
            assert channel.has_pending()

    run(main)


def test_messages_arrive_byte_by_byte(run: Run) -> None:
    """One byte per read, each in a buffer the stream reuses (as its reads do)."""

    async def main() -> None:
        async with agent() as (channel, stream, _):
            messages: list[Message] = [WELCOME, Dial(count=2), Ping(seq=4)]
            data = b"".join(protocol.encode(m) for m in messages)
            shared = bytearray(1)
            for byte in data:
                shared[0] = byte
                channel.on_data(stream, memoryview(shared))
            shared[0] = 0  # what the next read would leave in the buffer
            assert [await channel.receive() for _ in messages] == messages

    run(main)


def test_a_frame_dribbled_through_the_socket_arrives(run: Run) -> None:
    async def main() -> None:
        async with agent() as (channel, _, peer):
            data = protocol.encode(WELCOME) + protocol.encode(Dial(count=5))
            receiving = asyncio.ensure_future(channel.receive())
            for i in range(len(data)):
                peer.send_raw(data[i : i + 1])
                await asyncio.sleep(0)
            assert await receiving == WELCOME
            assert await channel.receive() == Dial(count=5)

    run(main)


def test_reading_pauses_above_the_queue_limit_and_resumes(run: Run) -> None:
    async def main() -> None:
        async with agent() as (channel, stream, peer):
            pings = [Ping(seq=i) for i in range(MAX_QUEUED_MESSAGES + 20)]
            # One write, read by the stream in one go: the channel queues every frame at once.
            peer.send(WELCOME, *pings)
            assert await channel.receive() == WELCOME
            assert stream.pauses == 1
            assert not stream.reading, "the channel holds more than its limit and still reads"
            taken = 0
            while stream.reading is False:
                assert await channel.receive() == pings[taken]
                taken += 1
            # It resumes once the queue has drained to half, not at the first message taken.
            assert taken > len(pings) - MAX_QUEUED_MESSAGES // 2 - 1
            assert stream.resumes == 1
            for ping in pings[taken:]:
                assert await channel.receive() == ping
            peer.send(Dial(count=1))  # and reading goes on
            assert await channel.receive() == Dial(count=1)

    run(main)


def test_a_bad_frame_is_a_remote_protocol_error(run: Run) -> None:
    async def main() -> None:
        async with agent() as (channel, _, peer):
            peer.send(WELCOME)
            peer.send_raw(struct.pack("!I", 5) + b"nope!")
            assert await channel.receive() == WELCOME, "what came before the bad frame is delivered"
            with pytest.raises(RemoteProtocolError, match="JSON"):
                await channel.receive()
            with pytest.raises(RemoteProtocolError):
                await channel.receive()

    run(main)


def test_a_frame_out_of_turn_is_a_remote_protocol_error(run: Run) -> None:
    async def main() -> None:
        async with agent() as (channel, _, peer):
            peer.send(Ping(seq=1))  # before the welcome
            with pytest.raises(RemoteProtocolError, match="ping"):
                await channel.receive()

    run(main)


def test_an_oversized_length_fails_before_the_frame_arrives(run: Run) -> None:
    async def main() -> None:
        async with agent() as (channel, _, peer):
            peer.send_raw(struct.pack("!I", protocol.MAX_FRAME_SIZE + 1))
            with pytest.raises(RemoteProtocolError, match="frame length"):
                await channel.receive()

    run(main)


def test_a_reset_is_a_connection_error(run: Run) -> None:
    async def main() -> None:
        channel, stream, peer = await _channel(Role.AGENT, tcp=True)
        channel.send(HELLO)
        assert await peer.receive() == HELLO
        peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        peer.close()
        with pytest.raises(ConnectionError, match="connection lost"):
            await channel.receive()
        assert await stream.lost is not None

    run(main)


def test_refuse_sends_the_error_and_lingers_until_the_peer_closes(run: Run) -> None:
    """The refused peer reads the whole error and a clean EOF, even with its bytes unread."""

    async def main() -> None:
        channel, stream, peer = await _channel(Role.RELAY, tcp=True)
        try:
            peer.send(HELLO)
            assert await channel.receive() == HELLO
            # Bytes the relay will never read: a bad frame stops the channel reading.
            peer.send_raw(b"\0" * 256 * 1024)
            with pytest.raises(RemoteProtocolError):
                await channel.receive()
            refusal = Error(code=protocol.CODE_AUTH, message="go away")
            channel.refuse(refusal)
            assert await peer.receive() == refusal
            # A plain close with unread input would have been a reset.
            assert await peer.receive() is None
            assert not stream.lost.done(), "the relay closed before the peer did"
            peer.close()
            assert await stream.lost is None
        finally:
            peer.close()
            channel.close()

    run(main)


def test_send_tells_the_heartbeat(run: Run) -> None:
    async def main() -> None:
        async with agent() as (channel, _, peer):
            await _ready(channel, peer)
            channel.heartbeat = heartbeat = protocol.Heartbeat(QUIET, 0.0)
            before = heartbeat.deadline()
            channel.send(Ping(seq=1))
            assert heartbeat.deadline() > before
            assert await peer.receive() == Ping(seq=1)

    run(main)


# -- serve_control ----------------------------------------------------------------------


class Handled:
    """A ``handle`` for serve_control that keeps what it is given."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def __call__(self, message: Message) -> None:
        self.messages.append(message)


def test_serve_control_answers_pings_and_hands_on_the_rest(run: Run) -> None:
    async def main() -> None:
        async with agent() as (channel, _, peer):
            await _ready(channel, peer)
            handled = Handled()
            serving = asyncio.ensure_future(serve_control(channel, QUIET, handled))
            peer.send(Ping(seq=7))
            assert await peer.receive() == Pong(seq=7)
            peer.send(
                Dial(count=2), Pong(seq=1), Ping(seq=8), Error(id=3, code="limit", message="no")
            )
            assert await peer.receive() == Pong(seq=8)
            peer.shutdown()
            await asyncio.wait_for(serving, 10)  # returns at EOF
            assert handled.messages == [Dial(count=2), Error(id=3, code="limit", message="no")]
            assert channel.heartbeat is None

    run(main)


def test_serve_control_returns_at_eof_after_handling_what_came_first(run: Run) -> None:
    async def main() -> None:
        async with agent() as (channel, _, peer):
            await _ready(channel, peer)
            handled = Handled()
            peer.send(*(Dial(count=n) for n in range(1, 6)))
            peer.shutdown()
            await asyncio.wait_for(serve_control(channel, QUIET, handled), 10)
            assert handled.messages == [Dial(count=n) for n in range(1, 6)]

    run(main)


def test_serve_control_pings_an_idle_peer(run: Run) -> None:
    async def main() -> None:
        async with agent() as (channel, _, peer):
            await _ready(channel, peer)
            serving = asyncio.ensure_future(serve_control(channel, BRISK, Handled()))
            for seq in (1, 2, 3):
                assert await asyncio.wait_for(peer.receive(), 10) == Ping(seq=seq)
                peer.send(Pong(seq=seq))
            peer.shutdown()
            await asyncio.wait_for(serving, 10)

    run(main)


def test_serve_control_gives_up_on_a_silent_peer(run: Run) -> None:
    async def main() -> None:
        async with agent() as (channel, _, peer):
            await _ready(channel, peer)
            with pytest.raises(HeartbeatTimeout):
                await asyncio.wait_for(serve_control(channel, BRISK, Handled()), 10)
            assert channel.heartbeat is None
            assert isinstance(await peer.receive(), Ping), "it asked before giving up"

    run(main)


def test_serve_control_raises_on_a_bad_frame(run: Run) -> None:
    async def main() -> None:
        async with agent() as (channel, _, peer):
            await _ready(channel, peer)
            peer.send(Welcome(session="again", key="k", domain="d", heartbeat=1, pool=1))
            with pytest.raises(RemoteProtocolError):
                await asyncio.wait_for(serve_control(channel, QUIET, Handled()), 10)

    run(main)


def test_a_busy_connection_sends_no_pings(run: Run) -> None:
    """While the agent writes more often than the interval, it never pings.

    The peer sends a dial every few milliseconds and the handler answers each
    with a frame of its own, for several intervals. Were writes not told to
    the heartbeat, a ping would go out every interval regardless.
    """

    async def main() -> None:
        async with agent() as (channel, _, peer):
            interval = 0.2
            rounds = 30  # at 20 ms apart: three intervals

            await _ready(channel, peer)

            async def answer(message: Message) -> None:
                assert isinstance(message, Dial)
                channel.send(Close(id=message.count))

            serving = asyncio.ensure_future(serve_control(channel, interval, answer))
            received: list[Message | None] = []
            for n in range(1, rounds + 1):
                peer.send(Dial(count=n))
                received.append(await asyncio.wait_for(peer.receive(), 10))
                await asyncio.sleep(interval / 10)
            peer.shutdown()
            await asyncio.wait_for(serving, 10)
            channel.close()
            while (message := await peer.receive()) is not None:
                received.append(message)
            assert received == [Close(id=n) for n in range(1, rounds + 1)]

    run(main)


# -- back-pressure ---------------------------------------------------------------------


async def _until(predicate: Callable[[], bool]) -> None:
    # What it waits for is in the kernel's and asyncio's buffers: nothing to await.
    while not predicate():  # noqa: ASYNC110
        await asyncio.sleep(0.005)


def test_a_peer_that_reads_no_answers_is_not_read(run: Run) -> None:
    """Pings from a peer that reads no pongs: the channel stops taking them once its
    answers pass the high-water mark, and goes on once the peer has read them."""

    async def main() -> None:
        async with agent() as (channel, stream, peer):
            await _ready(channel, peer)
            handled = Handled()
            serving = asyncio.ensure_future(serve_control(channel, QUIET, handled))
            loop = asyncio.get_running_loop()
            pings = b"".join(protocol.encode(Ping(seq=n)) for n in range(2000))
            flooding = asyncio.ensure_future(_flood(loop, peer, pings))
            await _until(lambda: stream.unsent > WRITE_HIGH_WATER)
            # Past the mark: the channel hands out no ping, so writes no pong, and
            # reads nothing, however many turns the loop takes.
            unsent = stream.unsent
            for _ in range(200):
                await asyncio.sleep(0)
            assert stream.unsent == unsent, "answers were still queued for a peer that reads none"
            assert not stream.reading
            assert not flooding.done()
            flooding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flooding
            # The peer reads the answers: reading goes on.
            while stream.unsent or not stream.reading:
                await peer.receive()
            channel.close()
            await asyncio.wait_for(serving, 10)  # what was queued is handed out, then EOF
            assert handled.messages == []

    run(main)


async def _flood(loop: asyncio.AbstractEventLoop, peer: Peer, data: bytes) -> None:
    while True:
        await loop.sock_sendall(peer.sock, data)


def test_a_peer_that_leaves_too_much_unread_is_reset(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(channel_module, "MAX_UNSENT_BYTES", 64 * 1024, raising=False)

    async def main() -> None:
        async with agent() as (channel, stream, peer):
            await _ready(channel, peer)
            sent = 0
            while not stream.closed and sent < 100_000:  # the kernel takes the first few
                channel.send(Ping(seq=sent))
                sent += 1
                if stream.unsent > 64 * 1024:
                    break
            await asyncio.wait_for(stream.lost, 10)
            with pytest.raises(ConnectionError, match="unread"):
                await channel.receive()

    run(main)
