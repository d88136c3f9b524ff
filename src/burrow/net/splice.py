"""Moving bytes between two streams, with back-pressure and half-close.

A :class:`Splice` joins a visitor's stream to a data connection (at the
relay) or a data connection to the local server (at the agent). Each
direction ends on its own EOF; the splice closes both streams once both
directions have ended, or aborts both when either side resets.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import logging
import os
import select
import socket
import threading
from collections.abc import Callable
from typing import Final, Protocol

from burrow.exception import RemoteProtocolError
from burrow.net.stream import LINGER_RESET, Chunk, Stream
from burrow.wire.text import loggable

log = logging.getLogger(__name__)


class Splice:
    """Two streams joined end to end."""

    def __init__(
        self,
        a: Stream,
        b: Stream,
        *,
        on_done: Callable[[Splice], None] | None = None,
    ) -> None:
        self.a = a
        self.b = b
        self._on_done: list[Callable[[Splice], None]] = [on_done] if on_done else []
        self._ended: set[int] = set()  # ids of streams whose incoming direction ended
        self.done = False
        self.bytes_a_to_b = 0
        self.bytes_b_to_a = 0

    def start(self, *, a_first: bytes = b"", b_first: bytes = b"") -> None:
        """Begin moving bytes; ``*_first`` are bytes already read from that side."""
        if a_first:
            self.on_data(self.a, a_first)
        if b_first:
            self.on_data(self.b, b_first)
        self.a.set_receiver(self)
        self.b.set_receiver(self)
        # Whatever ended while the streams waited to be joined ends here too.
        for stream in (self.a, self.b):
            if stream.closed:
                self.on_close(stream, None)
            elif stream.peer_eof:
                self.on_eof(stream)
        if not self.done:
            self.a.resume_reading()
            self.b.resume_reading()

    def _other(self, stream: Stream) -> Stream:
        return self.b if stream is self.a else self.a

    def on_data(self, stream: Stream, data: Chunk) -> None:
        if stream is self.a:
            self.bytes_a_to_b += len(data)
        else:
            self.bytes_b_to_a += len(data)
        self._other(stream).write(data)

    def on_eof(self, stream: Stream) -> None:
        if id(stream) in self._ended:
            return
        self._ended.add(id(stream))
        self._other(stream).write_eof()
        if len(self._ended) == 2:
            self._finish(abort=False)

    def on_close(self, stream: Stream, exc: BaseException | None) -> None:
        # A reset is passed on as a reset; a plain close as a plain close,
        # after the bytes already buffered for the other side.
        self._finish(abort=exc is not None)

    def on_pause_writing(self, stream: Stream) -> None:
        # ``stream`` cannot take more for now: stop reading what feeds it.
        self._other(stream).pause_reading()

    def on_resume_writing(self, stream: Stream) -> None:
        self._other(stream).resume_reading()

    def close(self) -> None:
        """End the splice from outside (its tunnel was closed)."""
        self._finish(abort=True)

    def add_done_callback(self, callback: Callable[[Splice], None]) -> None:
        """Call ``callback(splice)`` when both directions have ended (now, if they have)."""
        if self.done:
            callback(self)
        else:
            self._on_done.append(callback)

    def _report(self) -> None:
        for callback in self._on_done:
            callback(self)

    def _finish(self, *, abort: bool) -> None:
        if self.done:
            return
        self.done = True
        for stream in (self.a, self.b):
            if abort:
                stream.abort()
            else:
                stream.close()
        self._report()


# Bytes a splice pipe holds: enough to move a large chunk per system call
# (the default 64 KiB pipe costs many more calls at multi-Gbit/s rates).
PIPE_SIZE: Final = 1024 * 1024

_SPLICE_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)


def kernel_splice_available() -> bool:
    return hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")


class _Flow:
    """One direction of a :class:`KernelSplice`: src socket -> pipe -> dst socket.

    Lives on the splice thread; nothing here runs on the event loop.
    """

    def __init__(
        self, owner: KernelSplice, src: socket.socket, dst: socket.socket, prefix: bytes
    ) -> None:
        self.owner = owner
        self.src = src
        self.dst = dst
        self.prefix = prefix
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.pipe_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self.in_pipe = 0
        self.src_eof = False
        self.ended = False
        self.reading = False
        self.writing = False

    def on_readable(self) -> None:
        try:
            n = os.splice(self.src.fileno(), self.pipe_w, PIPE_SIZE, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            self.owner.fail(exc)
            return
        if n == 0:
            self.src_eof = True
        self.in_pipe += n
        self.owner.moved(self, n)
        self.drain()

    def drain(self) -> None:
        try:
            while self.prefix:
                sent = self.dst.send(self.prefix)
                self.prefix = self.prefix[sent:]
            while self.in_pipe:
                self.in_pipe -= os.splice(
                    self.pipe_r, self.dst.fileno(), self.in_pipe, flags=_SPLICE_FLAGS
                )
        except BlockingIOError:
            pass
        except OSError as exc:
            self.owner.fail(exc)
            return
        if self.prefix or self.in_pipe:
            # dst is full: stop reading src until it drains (back-pressure).
            self.reading, self.writing = False, True
        elif self.src_eof:
            self.reading = self.writing = False
            with contextlib.suppress(OSError):
                self.dst.shutdown(socket.SHUT_WR)
            self.ended = True
        else:
            self.reading, self.writing = True, False
        _engine.update(self)
        if self.ended:
            self.owner.flow_ended()

    def close_pipe(self) -> None:
        for fd in (self.pipe_r, self.pipe_w):
            with contextlib.suppress(OSError):
                os.close(fd)


class _SpliceThread:
    """One thread per process that moves the bytes of every kernel splice.

    It has its own level-triggered epoll: errors and hang-ups are seen as
    the kernel reports them (uvloop's add_reader drops a reset that arrives
    together with data), and the splice calls, which release the GIL, run
    beside the event loop instead of on it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._epoll: select.epoll | None = None
        self._wake_r = self._wake_w = -1
        self._commands: collections.deque[Callable[[], None]] = collections.deque()
        # fd -> (flow reading it, flow writing it)
        self._watch: dict[int, list[_Flow | None]] = {}

    def submit(self, command: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None:
                self._epoll = select.epoll()
                self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                self._epoll.register(self._wake_r, select.EPOLLIN)
                self._thread = threading.Thread(target=self._run, name="burrow-splice", daemon=True)
                self._thread.start()
            self._commands.append(command)
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def update(self, flow: _Flow) -> None:
        """Watch ``flow.src`` for reading and ``flow.dst`` for writing as its flags say."""
        self._set(flow.src.fileno(), 0, flow if flow.reading else None, flow)
        self._set(flow.dst.fileno(), 1, flow if flow.writing else None, flow)

    def forget(self, flow: _Flow) -> None:
        flow.reading = flow.writing = False
        for fd in (flow.src.fileno(), flow.dst.fileno()):
            if fd >= 0:
                self._set(fd, 0, None, flow)
                self._set(fd, 1, None, flow)

    def _set(self, fd: int, slot: int, value: _Flow | None, flow: _Flow) -> None:
        assert self._epoll is not None
        watch = self._watch.get(fd)
        if watch is None:
            if value is None:
                return
            watch = self._watch[fd] = [None, None]
            watch[slot] = value
            self._epoll.register(fd, self._mask(watch))
            return
        if value is None and watch[slot] is not flow:
            return
        if watch[slot] is value:
            return
        watch[slot] = value
        if watch[0] is None and watch[1] is None:
            del self._watch[fd]
            with contextlib.suppress(OSError):
                self._epoll.unregister(fd)
        else:
            self._epoll.modify(fd, self._mask(watch))

    @staticmethod
    def _mask(watch: list[_Flow | None]) -> int:
        return (select.EPOLLIN if watch[0] else 0) | (select.EPOLLOUT if watch[1] else 0)

    def _run(self) -> None:
        assert self._epoll is not None
        while True:
            for fd, events in self._epoll.poll():
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    while True:
                        with self._lock:
                            if not self._commands:
                                break
                            command = self._commands.popleft()
                        command()
                    continue
                watch = self._watch.get(fd)
                if watch is None:
                    continue
                reader, writer = watch
                # An error or hang-up wakes both sides; the next call reports it.
                if reader is not None and events & (
                    select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
                ):
                    reader.on_readable()
                watch = self._watch.get(fd)
                writer = watch[1] if watch is not None else None
                if writer is not None and events & (
                    select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
                ):
                    writer.drain()


_engine = _SpliceThread()


class KernelSplice(Splice):
    """Two plain TCP streams joined with ``splice(2)``: bytes never enter Python.

    Used where neither side is TLS: a raw TCP visitor and a plaintext data
    connection at the relay, a plaintext data connection and the local
    server at the agent. Half-close and resets pass as they do in
    :class:`Splice`. The bytes move on the process's splice thread; the
    event loop only hands the sockets over and hears when they are done.
    """

    def __init__(
        self, a: Stream, b: Stream, *, on_done: Callable[[Splice], None] | None = None
    ) -> None:
        super().__init__(a, b, on_done=on_done)
        self.loop = asyncio.get_running_loop()
        self._flows: list[_Flow] = []
        self._socks: list[socket.socket] = []

    @staticmethod
    def possible(a: Stream, b: Stream) -> bool:
        return (
            kernel_splice_available()
            and type(a) is Stream
            and type(b) is Stream
            and a.can_detach()
            and b.can_detach()
        )

    def start(self, *, a_first: bytes = b"", b_first: bytes = b"") -> None:
        sock_a, held_a, eof_a = self.a.detach()
        sock_b, held_b, eof_b = self.b.detach()
        self._socks = [sock_a, sock_b]
        forward = _Flow(self, sock_a, sock_b, a_first + held_a)
        backward = _Flow(self, sock_b, sock_a, b_first + held_b)
        forward.src_eof, backward.src_eof = eof_a, eof_b
        self._flows = [forward, backward]

        def begin() -> None:
            for flow in self._flows:
                if not self._stopped:
                    flow.drain()

        self._stopped = False
        _engine.submit(begin)

    # -- on the splice thread -------------------------------------------------

    def moved(self, flow: _Flow, n: int) -> None:
        if flow is self._flows[0]:
            self.bytes_a_to_b += n
        else:
            self.bytes_b_to_a += n

    def flow_ended(self) -> None:
        if all(flow.ended for flow in self._flows):
            self._end(abort=False)

    def fail(self, exc: OSError) -> None:
        self._end(abort=True)

    def _end(self, *, abort: bool) -> None:
        if self._stopped:
            return
        self._stopped = True
        for flow in self._flows:
            _engine.forget(flow)
            flow.close_pipe()
        for sock in self._socks:
            if abort:
                # Linger 0 makes close() send a reset, as a reset arrived.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            sock.close()
        with contextlib.suppress(RuntimeError):  # the loop may be closed at exit
            self.loop.call_soon_threadsafe(self._report_done)

    # -- on the event loop ------------------------------------------------------

    def _report_done(self) -> None:
        # The flows refer back to this splice, and the splice thread is done with
        # them: letting go frees splice, flows and streams by reference counting.
        self._flows = []
        self._socks = []
        if self.done:
            return
        self.done = True
        self._report()

    def _finish(self, *, abort: bool) -> None:
        """End from the event loop (the tunnel closed): reset both sides."""
        if self._flows:
            _engine.submit(lambda: self._end(abort=True))
        else:
            self._report_done()


class Inspector(Protocol):
    """Reads what crosses an :class:`InspectedSplice`; ``a`` is the visitor's side.

    ``from_visitor`` returns what of the visitor's bytes to forward, ``to_visitor``
    what to pass back (the other side's bytes, with anything of its own in
    between), ``replies`` what it has to say to the visitor right now. Each may
    raise :class:`RemoteProtocolError`, which ends the splice.
    """

    def from_visitor(self, data: Chunk) -> Chunk: ...

    def to_visitor(self, data: Chunk) -> Chunk: ...

    def replies(self) -> bytes: ...


class InspectedSplice(Splice):
    """A splice whose bytes pass through an :class:`Inspector` (the relay's h2 check).

    A subclass so that a plain :class:`Splice` keeps its per-chunk path as it
    was, and never a :class:`KernelSplice`, whose bytes Python never sees.
    """

    def __init__(
        self,
        a: Stream,
        b: Stream,
        inspector: Inspector,
        *,
        on_done: Callable[[Splice], None] | None = None,
    ) -> None:
        super().__init__(a, b, on_done=on_done)
        self.inspector = inspector

    def on_data(self, stream: Stream, data: Chunk) -> None:
        if self.done:
            return
        try:
            if stream is self.a:
                self.bytes_a_to_b += len(data)
                forward = self.inspector.from_visitor(data)
                if forward:
                    self.b.write(forward)
                reply = self.inspector.replies()
                if reply:
                    self.a.write(reply)
            else:
                self.bytes_b_to_a += len(data)
                self.a.write(self.inspector.to_visitor(data))
        except RemoteProtocolError as exc:
            side = "visitor" if stream is self.a else "server"
            why = loggable(exc)  # the visitor's or the server's own words
            log.info("closing %s: its %s broke the protocol: %s", self.a.peername, side, why)
            self._finish(abort=False)


def join(
    a: Stream,
    b: Stream,
    *,
    on_done: Callable[[Splice], None] | None = None,
    inspector: Inspector | None = None,
) -> Splice:
    """The fastest splice that can join ``a`` and ``b``; through ``inspector`` if given."""
    if inspector is not None:
        return InspectedSplice(a, b, inspector, on_done=on_done)
    if KernelSplice.possible(a, b):
        return KernelSplice(a, b, on_done=on_done)
    return Splice(a, b, on_done=on_done)
