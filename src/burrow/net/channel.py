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

from burrow.exception import ConnectionError, LocalProtocolError, RemoteProtocolError
from burrow.net.stream import Chunk, Stream
from burrow.wire import protocol

# Frames buffered but not yet taken before we stop reading the peer.
MAX_QUEUED_MESSAGES = 256


class Channel:
    """One framed connection (control, or a data connection before its bind)."""

    def __init__(self, stream: Stream, connection: protocol.Connection) -> None:
        self.stream = stream
        self.connection = connection
        self._messages: collections.deque[protocol.Message] = collections.deque()
        self._error: BaseException | None = None
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
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

    def on_eof(self, stream: Stream) -> None:
        self._eof = True
        self._wake()

    def on_close(self, stream: Stream, exc: BaseException | None) -> None:
        self._eof = True
        if exc is not None and self._error is None:
            self._error = ConnectionError(f"connection lost: {exc}")
        self._wake()

    def on_pause_writing(self, stream: Stream) -> None:
        pass

    def on_resume_writing(self, stream: Stream) -> None:
        pass

    def _spliced(self) -> bool:
        return self.connection.state is protocol.State.SPLICED

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- for the shells ---------------------------------------------------

    async def receive(self) -> protocol.Message | None:
        """The next message, or ``None`` once the peer has closed."""
        while not self._messages:
            if self._error is not None:
                raise self._error
            if self._eof:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        message = self._messages.popleft()
        if self._paused and len(self._messages) < MAX_QUEUED_MESSAGES // 2 and not self._spliced():
            self._paused = False
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

    def close(self) -> None:
        self.stream.close()

    def refuse(self, error: protocol.Error) -> None:
        """Send ``error`` and close, reading and dropping what the peer still sends so
        that the close does not turn into a reset that destroys the error."""
        with contextlib.suppress(LocalProtocolError):
            self.send(error)
        self.stream.close_lingering()
