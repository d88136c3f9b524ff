"""Byte streams over TCP, in the clear or TLS, with one interface for burrow's I/O shells.

burrow runs TLS itself (``ssl.SSLObject`` over memory BIOs) instead of using
asyncio's TLS transport, because asyncio's cannot half-close: a visitor's
EOF must travel through the relay's TLS data connection as a TLS
``close_notify`` while bytes keep flowing the other way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol, cast

from burrow.exception import RemoteProtocolError

if TYPE_CHECKING:
    # Only a relay reads ClientHellos; the client does not load the parser.
    from burrow.wire.clienthello import ClientHello

# Bytes per socket read and per TLS read call; big reads amortise Python's
# per-call cost.
READ_SIZE: Final = 256 * 1024
TLS_READ_SIZE: Final = 256 * 1024

# A transport whose kernel-side backlog passes this many bytes asks its
# producer to pause; big enough to keep a fast link busy, small enough that
# a slow visitor cannot make the relay hold much of anyone's stream.
WRITE_HIGH_WATER: Final = 512 * 1024
# A stream whose reads keep filling the whole buffer yields the event loop
# after this many bytes: libuv reads a ready socket up to 32 times in a row,
# so without a budget a few bulk transfers made one turn of the loop last a
# second and more, and a new visitor's handshakes waited behind them.
READ_TURN_BUDGET: Final = READ_SIZE
# SO_LINGER on, zero seconds: close() sends a reset.
LINGER_RESET: Final = struct.pack("ii", 1, 0)
WRITE_LOW_WATER: Final = 128 * 1024
# How long close_lingering() reads and drops what a refused peer still sends
# before it closes anyway.
LINGER_SECONDS: Final = 2.0


# What a stream hands its receiver: valid only during the call (it may be a
# view of a buffer that the next read reuses), so a receiver copies what it keeps.
Chunk = bytes | memoryview


class _Buffers(threading.local):
    """Per-thread (so per event loop) buffers that reads and decryption reuse.

    Reading into one buffer instead of a fresh ``bytes`` per read spares a
    256 KiB allocation per call, which at Gbit/s rates made glibc map, fault
    in and return the same pages over and over.
    """

    def __init__(self) -> None:
        self.read = memoryview(bytearray(READ_SIZE))
        self.plain = memoryview(bytearray(TLS_READ_SIZE))


_buffers = _Buffers()


class Receiver(Protocol):
    """What a stream tells whoever consumes it."""

    def on_data(self, stream: Stream, data: Chunk) -> None: ...

    def on_eof(self, stream: Stream) -> None: ...

    def on_close(self, stream: Stream, exc: BaseException | None) -> None: ...

    def on_pause_writing(self, stream: Stream) -> None: ...

    def on_resume_writing(self, stream: Stream) -> None: ...


class BaseReceiver:
    """A receiver that ignores everything; subclasses override what they need."""

    def on_data(self, stream: Stream, data: Chunk) -> None:
        pass

    def on_eof(self, stream: Stream) -> None:
        pass

    def on_close(self, stream: Stream, exc: BaseException | None) -> None:
        pass

    def on_pause_writing(self, stream: Stream) -> None:
        pass

    def on_resume_writing(self, stream: Stream) -> None:
        pass


class _Unclaimed(BaseReceiver):
    """Holds what arrives before anyone claims the stream."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False
        self.closed: tuple[BaseException | None] | None = None

    def on_data(self, stream: Stream, data: Chunk) -> None:
        self.data += data

    def on_eof(self, stream: Stream) -> None:
        self.eof = True

    def on_close(self, stream: Stream, exc: BaseException | None) -> None:
        self.closed = (exc,)


class _Gone(BaseReceiver):
    """The receiver of a stream whose connection is lost: drops everything."""


_GONE: Final = _Gone()

# What a TlsStream's BIOs are before it has TLS state: always empty (never written).
_NO_BIO: Final = ssl.MemoryBIO()


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Stream(asyncio.BufferedProtocol):
    """A plain TCP byte stream; :class:`TlsStream` adds TLS on top.

    Reads land in a buffer shared by the streams of one event loop, and
    writes go straight to the socket while nothing is queued in front of
    them, so moving a chunk costs no allocation and no copy in Python.
    """

    def __init__(self, on_connected: Callable[[Stream], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self._on_connected_callback = on_connected
        self._receiver: Receiver = _Unclaimed()
        self._read_buffer = _buffers.read
        self._fd = -1
        self.closed = False
        self.eof_sent = False
        self.peer_eof = False
        self._paused = False  # reading paused by the consumer (back-pressure)
        self._yielding = False  # reading paused until the loop's next turn
        self._turn_bytes = 0
        self._fin_sent = False  # our TCP write side is shut: nothing more may be sent
        self._lingering: asyncio.TimerHandle | None = None  # see close_lingering()

    # -- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        set_nodelay(transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._fd = sock.fileno()
        self._read_buffer = _buffers.read  # this loop's thread's buffer
        self._on_connected()

    def _on_connected(self) -> None:
        if self._on_connected_callback is not None:
            self._on_connected_callback(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self._lingering is not None:
            return  # close_lingering(): what the peer still sends is dropped
        if nbytes == len(self._read_buffer):  # there may be more: libuv reads again
            self._turn_bytes += nbytes
            if self._turn_bytes >= READ_TURN_BUDGET:
                self._yield_turn()
        else:
            self._turn_bytes = 0
        self.data_received(self._read_buffer[:nbytes])

    def _yield_turn(self) -> None:
        """Stop reading until the loop has served everyone else once."""
        self._turn_bytes = 0
        if self._yielding or self.transport is None or self.closed:
            return
        self._yielding = True
        if not self._paused:
            self.transport.pause_reading()
        asyncio.get_running_loop().call_soon(self._end_turn)

    def _end_turn(self) -> None:
        self._yielding = False
        transport = self.transport
        if (
            not self._paused
            and not self.closed
            and transport is not None
            and not transport.is_closing()
        ):
            transport.resume_reading()

    def data_received(self, data: Chunk) -> None:
        self._receiver.on_data(self, data)

    def eof_received(self) -> bool:
        if self._lingering is not None:
            return False  # the peer is done too: close
        self._deliver_eof()
        return True  # keep our write side open: the peer only half-closed

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lingering is not None:
            self._lingering.cancel()
            self._lingering = None
        if not self.closed:
            self.closed = True
            self._receiver.on_close(self, exc)
        # A splice or channel and this stream refer to each other: let go of the
        # receiver (one still unclaimed keeps what it holds for set_receiver) so
        # that both are freed by reference counting, not at the collector's
        # next full pass. Thousands of closed TLS streams with their OpenSSL
        # state waited for it after bursts of visitors.
        if not isinstance(self._receiver, _Unclaimed):
            self._receiver = _GONE

    def pause_writing(self) -> None:
        self._receiver.on_pause_writing(self)

    def resume_writing(self) -> None:
        self._receiver.on_resume_writing(self)

    # -- for consumers ----------------------------------------------------

    def set_receiver(self, receiver: Receiver) -> None:
        """Hand the stream to ``receiver``, replaying anything that arrived before."""
        held = self._receiver
        self._receiver = receiver
        if isinstance(held, _Unclaimed):
            if held.data:
                receiver.on_data(self, bytes(held.data))
            if held.eof:
                receiver.on_eof(self)
            if held.closed is not None:
                receiver.on_close(self, held.closed[0])

    def _deliver_eof(self) -> None:
        if not self.peer_eof:
            self.peer_eof = True
            self._receiver.on_eof(self)

    @property
    def peername(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        if not peer:
            return "?"
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def write(self, data: Chunk) -> None:
        if self.transport is not None and not self.closed and not self.eof_sent:
            self._send(self.transport, data)

    def _send(self, transport: asyncio.Transport, data: Chunk) -> None:
        """Write to the socket directly if nothing is queued; queue the rest as bytes."""
        if self._fin_sent:
            return
        if self._fd >= 0 and not transport.get_write_buffer_size():
            # is_closing() turns true before the transport closes its descriptor,
            # whose number the kernel may then give to someone else's socket.
            if transport.is_closing():
                return
            try:
                sent = os.write(self._fd, data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0  # the transport meets the same error and reports it
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(data if type(data) is bytes else bytes(data))

    @property
    def unsent(self) -> int:
        """Bytes written but not yet taken by the kernel (asyncio's write buffer)."""
        transport = self.transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def write_eof(self) -> None:
        if self.transport is None or self.closed or self.eof_sent:
            return
        self.eof_sent = True
        if self.transport.can_write_eof():
            self._fin_sent = True
            self.transport.write_eof()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            if not self._paused and not self._yielding:
                self.transport.pause_reading()
            self._paused = True

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            if self._paused and not self._yielding:
                self.transport.resume_reading()
            self._paused = False

    def can_detach(self) -> bool:
        """Whether :meth:`detach` can take the socket without losing a byte."""
        return (
            self.transport is not None
            and not self.closed
            and not self.eof_sent
            and self.transport.get_write_buffer_size() == 0
            and self.transport.get_extra_info("socket") is not None
        )

    def detach(self) -> tuple[socket.socket, bytes, bool]:
        """Take the socket away from asyncio: (socket, bytes held, peer EOF seen).

        The stream is finished afterwards; its transport closes only its own
        descriptor, so the socket lives on in the duplicate returned here.
        """
        assert self.transport is not None and self.can_detach()
        self.transport.pause_reading()
        raw = self.transport.get_extra_info("socket")
        sock = socket.socket(fileno=os.dup(raw.fileno()))
        sock.setblocking(False)
        self._fd = -1
        held = self._receiver
        data = bytes(held.data) if isinstance(held, _Unclaimed) else b""
        eof = self.peer_eof or (isinstance(held, _Unclaimed) and held.eof)
        self.closed = True  # no more callbacks to anyone
        self._receiver = _Unclaimed()
        self.transport.abort()
        return sock, data, eof

    def close(self) -> None:
        """Flush what is buffered, then close."""
        if self.transport is not None:
            self.transport.close()

    def close_lingering(self, seconds: float = LINGER_SECONDS) -> None:
        """Close after a refusal without losing the answer just written.

        Closing a socket with unread input makes the kernel send a reset,
        which can destroy what is still on its way to the peer: a 404, an
        error frame. So: flush, end our side (close_notify first under TLS,
        then a FIN), read and drop whatever the peer still sends, and close
        at its FIN or after ``seconds``.
        """
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            self.close()
            return
        self.write_eof()
        if not self._fin_sent and self._may_send_fin() and transport.can_write_eof():
            self._fin_sent = True
            transport.write_eof()
        self._lingering = asyncio.get_running_loop().call_later(seconds, self._linger_expired)
        self._paused = False
        if not self._yielding:
            transport.resume_reading()

    def _may_send_fin(self) -> bool:
        """Whether everything of ours that must precede the FIN has been written."""
        return True

    def _linger_expired(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close at once, dropping buffered bytes; the peer sees a reset.

        A plain ``transport.abort()`` sends a FIN when nothing is left unread,
        and a FIN reads as a clean end: a local server that crashed mid-reply
        would look like one that finished. A zero linger makes close() reset.
        """
        transport = self.transport
        if transport is None:
            return
        # Only while the transport still owns its descriptor: after close the
        # number may belong to someone else's socket.
        if not transport.is_closing():
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        transport.abort()


HandshakeCallback = Callable[["TlsStream", BaseException | None], None]

# Told the ClientHello and the bytes that carried it before any TLS is done;
# True means it took the connection away (handed it to another process).
HelloCallback = Callable[["TlsStream", "ClientHello", bytes], bool]


class TlsStream(Stream):
    """TLS over a TCP transport, able to half-close in each direction.

    ``on_handshake`` runs once: with ``None`` when the handshake is done
    (the caller then picks a receiver), or with the error that ended it.
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        on_handshake: HandshakeCallback,
        server_hostname: str | None = None,
        handshake_timeout: float | None = None,
        plain_reply: bytes | None = None,
        on_client_hello: HelloCallback | None = None,
        prelude: bytes = b"",
        on_connected: Callable[[Stream], None] | None = None,
        session: ssl.SSLSession | None = None,
    ) -> None:
        """``prelude``: bytes another process already read from this connection;
        ``on_connected``: told when the transport is there (the peer's address known);
        ``session``: a client's TLS session to resume, from an earlier connection
        made with the same context (the server then neither signs nor sends its
        certificate, and this side does not verify it again)."""
        super().__init__(on_connected)
        self._context = context
        self._server_side = server_side
        self._server_hostname = server_hostname
        # The TLS state (SSLObject, BIOs, OpenSSL's buffers: some 40 KiB) is
        # made only when there is TLS to do, so a silent socket costs little.
        self._ssl: ssl.SSLObject | None = None
        self._incoming = self._outgoing = _NO_BIO
        self._on_handshake: HandshakeCallback | None = on_handshake
        self._handshake_timeout = handshake_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._plain_reply = plain_reply
        self._seen_first_byte = False
        self._reading = False
        self._eof_deferred = False
        self._plain_buffer = _buffers.plain
        self._on_client_hello = on_client_hello
        self._hello = bytearray()
        self._prelude = prelude
        self._session = session
        self.handshake_done = False
        self.created = time.monotonic()
        """When the connection came (``time.monotonic()``): a handshake's duration starts here."""
        if not server_side:
            # A client always speaks TLS: its state is made now, so that it takes the
            # context's ALPN as it is while the caller holds tls.offering().
            self._start_tls()

    # -- handshake --------------------------------------------------------

    @property
    def ssl_object(self) -> ssl.SSLObject:
        """The TLS connection; a server's is made when the peer's first bytes arrive."""
        return self._ssl if self._ssl is not None else self._start_tls()

    def _start_tls(self) -> ssl.SSLObject:
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._ssl = self._context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=self._server_side,
            server_hostname=self._server_hostname,
            session=self._session,
        )
        self._session = None
        return self._ssl

    def _on_connected(self) -> None:
        self._plain_buffer = _buffers.plain  # this loop's thread's buffer
        if self._handshake_timeout is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._handshake_timeout, self._handshake_expired)
        super()._on_connected()
        if not self._server_side:
            self._step_handshake()  # a client speaks first; a server waits for its hello
        if self._prelude:
            prelude, self._prelude = self._prelude, b""
            self.data_received(prelude)

    def _handshake_expired(self) -> None:
        self._timer = None
        self._fail_handshake(TimeoutError("TLS handshake timed out"))

    def _cancel_timer(self) -> None:
        # The handle refers back to this stream: dropping it keeps a closed
        # stream out of a reference cycle, so it is freed at once, TLS state
        # and all, instead of at the garbage collector's next full pass.
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail_handshake(self, exc: BaseException) -> None:
        callback, self._on_handshake = self._on_handshake, None
        self._cancel_timer()
        self._flush()
        if self.transport is not None:
            self.transport.close()
        if callback is not None:
            callback(self, exc)

    def _step_handshake(self) -> None:
        try:
            self.ssl_object.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, ValueError) as exc:
            self._fail_handshake(exc)
            return
        self.handshake_done = True
        self._cancel_timer()
        self._flush()
        callback, self._on_handshake = self._on_handshake, None
        if callback is not None:
            callback(self, None)
        self._read_records()

    # -- asyncio.Protocol -------------------------------------------------

    def data_received(self, data: Chunk) -> None:
        if not self._seen_first_byte and data:
            self._seen_first_byte = True
            # 0x16 opens every TLS handshake; a letter is someone speaking plain
            # HTTP to the TLS port, who deserves a readable answer.
            if self._plain_reply is not None and bytes(data[:1]).isalpha():
                if self.transport is not None:
                    self.transport.write(self._plain_reply)
                self._fail_handshake(ssl.SSLError("plain text on the TLS port"))
                return
        if self._on_client_hello is not None:
            if not self._read_hello(data):
                return
            data, self._hello = bytes(self._hello), bytearray()
        if self._ssl is None:
            self._start_tls()
        self._incoming.write(data)
        if not self.handshake_done:
            if self._on_handshake is not None:
                self._step_handshake()
            return
        self._read_records()

    def _read_hello(self, data: Chunk) -> bool:
        """Gather the ClientHello for ``on_client_hello``; True once OpenSSL may have the bytes."""
        from burrow.wire.clienthello import parse_client_hello

        self._hello += data
        try:
            hello = parse_client_hello(bytes(self._hello))
        except RemoteProtocolError:
            hello = None  # not a ClientHello: OpenSSL refuses it with a proper alert
        else:
            if hello is None:
                return False  # more to come
        callback, self._on_client_hello = self._on_client_hello, None
        if hello is not None and callback is not None:
            # False from the callback: this process serves the connection after all.
            return not callback(self, hello, bytes(self._hello))
        return True

    def hand_off(self) -> socket.socket:
        """Give up the connection before its handshake, for another process to serve."""
        self._on_handshake = None
        self._cancel_timer()
        sock, _, _ = self.detach()
        return sock

    def eof_received(self) -> bool:
        if self._lingering is not None:
            return False
        if not self.handshake_done:
            self._fail_handshake(ConnectionResetError("peer closed during the TLS handshake"))
            return False
        # A TCP FIN without close_notify still ends the peer's stream, as a
        # half-close. The BIO is not told: OpenSSL would take the FIN for a
        # truncation, send an alert and fail the connection both ways.
        self._read_records()
        self._deliver_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._on_handshake is not None:
            self._fail_handshake(exc or ConnectionResetError("connection lost in TLS handshake"))
        super().connection_lost(exc)

    def _read_records(self) -> None:
        self._reading = True
        try:
            self._read_loop()
        finally:
            self._reading = False
        if self._eof_deferred:
            self._eof_deferred = False
            self._send_close_notify()
        # Reading can produce records to send (key updates, session tickets).
        self._flush()

    def _read_loop(self) -> None:
        # OpenSSL hands out one record (at most 16 KiB) per read: gather them
        # and pass them on together, one write for the receiver instead of 16.
        buffer = self._plain_buffer
        size = len(buffer)
        filled = 0
        eof = False
        error: ssl.SSLError | None = None
        while not self.closed:
            # Nothing buffered on either side of OpenSSL: a read could only
            # raise SSLWantReadError, which costs more than this check.
            if not self._incoming.pending and not self.ssl_object.pending():
                break
            try:
                # typeshed types read() as bytes; given a buffer, it returns a count.
                n = cast(int, self.ssl_object.read(size - filled, buffer[filled:]))
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                eof = True
                break
            except ssl.SSLError as exc:
                error = exc
                break
            if not n:
                eof = True
                break
            filled += n
            if filled == size:
                self._receiver.on_data(self, buffer)
                filled = 0
        if filled and not self.closed:
            self._receiver.on_data(self, buffer[:filled])
        if error is not None and not self.closed:
            self._flush()
            self.abort()
            self.closed = True
            self._receiver.on_close(self, error)
        elif eof:
            self._deliver_eof()

    def _flush(self) -> None:
        if self._outgoing.pending and self.transport is not None and not self.closed:
            self._send(self.transport, self._outgoing.read())

    # -- for consumers ----------------------------------------------------

    @property
    def server_name(self) -> str | None:
        """The SNI the peer sent, as recorded by the server's SNI callback."""
        name = getattr(self._ssl, "burrow_server_name", None)
        return name if isinstance(name, str) else None

    @property
    def alpn(self) -> str | None:
        return self._ssl.selected_alpn_protocol() if self._ssl is not None else None

    def write(self, data: Chunk) -> None:
        if self.transport is None or self.closed or self.eof_sent or not self.handshake_done:
            return
        try:
            self.ssl_object.write(data)
        except ssl.SSLError as exc:
            self.abort()
            self.closed = True
            self._receiver.on_close(self, exc)
            return
        self._flush()

    def write_eof(self) -> None:
        if self.transport is None or self.closed or self.eof_sent:
            return
        self.eof_sent = True
        if not self.handshake_done:
            return
        if self._reading:
            self._eof_deferred = True
            return
        # unwrap() tries to read the peer's close_notify and fails on any
        # whole application record still buffered, so take those first.
        if self._incoming.pending:
            self._read_records()
        self._send_close_notify()

    def _may_send_fin(self) -> bool:
        return not self._eof_deferred  # close_notify still to come

    def _send_close_notify(self) -> None:
        # Sends close_notify; reading goes on until the peer's own (TLS 1.3 half-close).
        with contextlib.suppress(ssl.SSLError):
            self.ssl_object.unwrap()
        self._flush()

    def close(self) -> None:
        self.write_eof()
        super().close()
