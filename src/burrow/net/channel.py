"""Frames over a stream: the thin I/O shell around :class:`burrow.wire.protocol.Connection`.

A :class:`Channel` feeds what its stream receives to the protocol and hands
out whole messages through :meth:`Channel.receive`; :meth:`Channel.send`
writes a message. Protocol errors surface from ``receive`` as
:class:`~burrow.exception.RemoteProtocolError`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable

from burrow.exception import ConnectionError, LocalProtocolError, RemoteProtocolError
from burrow.net.stream import BaseReceiver, Chunk, Stream
from burrow.wire import protocol

# Frames buffered but not yet taken before we stop reading the peer.
MAX_QUEUED_MESSAGES = 256

# Bytes written to a channel but not yet taken by the peer, past which the peer
# is taken to read nothing and the connection is reset. While more than the
# stream's WRITE_HIGH_WATER (512 KiB) waits, a channel takes no new message
# from its peer, so requests cannot pile up answers; what can still grow is
# the frames a side sends on its own (a relay's dials and pings), a few dozen
# bytes each. Eight times the high-water mark is far beyond what a live peer
# leaves unread, and small enough that a thousand mute peers cost a relay
# no more than their kernel buffers' worth each.
MAX_UNSENT_BYTES = 4 * 1024 * 1024


class Channel(BaseReceiver):
    """One framed connection (control, or a data connection before its bind)."""

    def __init__(self, stream: Stream, connection: protocol.Connection) -> None:
        self.stream = stream
        self.connection = connection
        # Told of every frame written, so that a busy connection sends no pings.
        self.heartbeat: protocol.Heartbeat | None = None
        self._messages: collections.deque[protocol.Message] = collections.deque()
        self._error: BaseException | None = None
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False  # reading paused: too many messages queued
        self._write_blocked = False  # the stream's writes are above its high-water mark
        # Set when the data connection is spliced: the raw bytes behind `bind`.
        self.trailing: bytes = b""
        stream.set_receiver(self)

    # -- Receiver ---------------------------------------------------------

    def on_data(self, stream: Stream, data: Chunk) -> None:
        if self._error is not None or self._spliced():
            self.trailing += data
            return
        try:
            self.connection.receive_data(data)
            while True:
                event = self.connection.next_event()
                if event is protocol.NEED_DATA:
                    break
                assert not isinstance(event, protocol.NeedData)
                self._messages.append(event)
                if self._spliced():
                    self.trailing = self.connection.take_trailing_data()
                    self.stream.pause_reading()
                    self._paused = True
                    break
        except RemoteProtocolError as exc:
            self._error = exc
            self.stream.pause_reading()
        if len(self._messages) >= MAX_QUEUED_MESSAGES and not self._paused:
            self._paused = True
            self.stream.pause_reading()
        self._wake()

    def on_pause_writing(self, stream: Stream) -> None:
        # A peer that does not read our answers gets no new ones: take no message
        # (receive() waits) and read nothing until it has caught up.
        self._write_blocked = True
        if not self._paused:
            self.stream.pause_reading()

    def on_resume_writing(self, stream: Stream) -> None:
        self._write_blocked = False
        if not self._paused and not self._spliced():
            self.stream.resume_reading()
        self._wake()

    def on_eof(self, stream: Stream) -> None:
        self._eof = True
        self._wake()

    def on_close(self, stream: Stream, exc: BaseException | None) -> None:
        self._eof = True
        self._write_blocked = False  # nothing more is written: hand out what came
        if exc is not None and self._error is None:
            self._error = ConnectionError(f"connection lost: {exc}")
        self._wake()

    def _spliced(self) -> bool:
        return self.connection.state is protocol.State.SPLICED

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- for the shells ---------------------------------------------------

    async def receive(self) -> protocol.Message | None:
        """The next message, or ``None`` once the peer has closed.

        Waits while the peer leaves more than the stream's high-water mark of
        what we sent unread (back-pressure: see :meth:`on_pause_writing`).
        """
        while not self._messages or self._write_blocked:
            if self._error is not None:
                raise self._error
            if self._eof and not self._messages:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        message = self._messages.popleft()
        if self._paused and len(self._messages) < MAX_QUEUED_MESSAGES // 2 and not self._spliced():
            self._paused = False
            if not self._write_blocked:
                self.stream.resume_reading()
        return message

    def has_pending(self) -> bool:
        """Whether anything arrived beyond what was taken: messages, bytes, an error or EOF."""
        return bool(
            self._messages
            or self._error is not None
            or self._eof
            or self.connection.trailing_data
            or self.trailing
        )

    def send(self, message: protocol.Message) -> None:
        self.stream.write(self.connection.send(message))
        if self.heartbeat is not None:
            self.heartbeat.sent(time.monotonic())
        unsent = self.stream.unsent
        if unsent > MAX_UNSENT_BYTES and self._error is None:
            # receive() raises this; the stream's reset frees what is queued at once.
            self._error = ConnectionError(
                f"the peer left {unsent} bytes unread (at most {MAX_UNSENT_BYTES})"
            )
            self.stream.abort()
            self._wake()

    def close(self) -> None:
        self.stream.close()

    def refuse(self, error: protocol.Error) -> None:
        """Send ``error`` and close, reading and dropping what the peer still sends so
        that the close does not turn into a reset that destroys the error."""
        with contextlib.suppress(LocalProtocolError):
            self.send(error)
        self.stream.close_lingering()


Handler = Callable[[protocol.Message], Awaitable[None]]


async def serve_control(channel: Channel, interval: float, handle: Handler) -> None:
    """The loop of a control connection, the same on both sides.

    Hands every message but the heartbeat's own to ``handle``, answers
    pings, sends one whenever ``interval`` seconds pass with nothing
    written, and returns when the peer closes. Raises
    :class:`~burrow.wire.protocol.HeartbeatTimeout` when the peer falls
    silent, :class:`RemoteProtocolError` on bad frames and
    :class:`ConnectionError` when the connection is lost.
    """
    heartbeat = protocol.Heartbeat(interval, time.monotonic())
    channel.heartbeat = heartbeat
    try:
        while True:
            timeout = max(0.0, heartbeat.deadline() - time.monotonic())
            try:
                message = await asyncio.wait_for(channel.receive(), timeout)
            except TimeoutError:
                ping = heartbeat.poll(time.monotonic())
                if ping is not None:
                    channel.send(ping)
                continue
            if message is None:
                return
            heartbeat.received(time.monotonic())
            match message:
                case protocol.Ping(seq=seq):
                    channel.send(protocol.Pong(seq=seq))
                case protocol.Pong():
                    pass
                case _:
                    await handle(message)
    finally:
        channel.heartbeat = None
