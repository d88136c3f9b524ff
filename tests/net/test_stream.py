"""Stream's read scheduling on uvloop, as the relay and the agent run it; and TlsStream.

One busy stream must not hold the event loop: libuv reads a ready socket up
to 32 times in a row, and under 64 bulk transfers that made one turn of the
loop last over a second, long enough for new visitors to wait out their
10 s for a data connection. A stream that fills its buffer yields after
READ_TURN_BUDGET bytes, and a consumer's pause (back-pressure) survives it.

TlsStream is tested here on its own, over loopback with a generated CA:
data both ways, half-closes (close_notify, and a bare FIN), the handshake
timeout, the plain reply to plain HTTP, and an untrusted certificate.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import uvloop

from burrow.net.devca import DevCertificates, ensure_dev_certificates
from burrow.net.stream import READ_SIZE, READ_TURN_BUDGET, BaseReceiver, Chunk, Stream, TlsStream

MIB = 1024 * 1024


class Recorder:
    """A receiver that notes, for every chunk, which turn of the loop it arrived in."""

    def __init__(self, turn: Callable[[], int]) -> None:
        self.turn = turn
        self.reads: list[tuple[int, int]] = []  # (turn, size)
        self.total = 0
        self.eof = asyncio.Event()
        self.on_chunk: Callable[[Stream], None] | None = None

    def on_data(self, stream: Stream, data: Chunk) -> None:
        self.reads.append((self.turn(), len(data)))
        self.total += len(data)
        if self.on_chunk is not None:
            self.on_chunk(stream)

    def on_eof(self, stream: Stream) -> None:
        self.eof.set()

    def on_close(self, stream: Stream, exc: BaseException | None) -> None:
        self.eof.set()

    def on_pause_writing(self, stream: Stream) -> None:
        pass

    def on_resume_writing(self, stream: Stream) -> None:
        pass


def _feed(sock: socket.socket, size: int) -> threading.Thread:
    """Write ``size`` bytes into ``sock`` from a thread, then half-close."""

    def run() -> None:
        block = b"x" * MIB
        left = size
        while left:
            left -= sock.send(block[: min(left, MIB)])
        sock.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


async def _stream_over_socketpair(
    turn: Callable[[], int],
) -> tuple[Stream, Recorder, socket.socket]:
    ours, theirs = socket.socketpair()
    for sock in (ours, theirs):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * MIB)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 * MIB)
    loop = asyncio.get_running_loop()
    _, stream = await loop.connect_accepted_socket(Stream, ours)
    recorder = Recorder(turn)
    stream.set_receiver(recorder)
    return stream, recorder, theirs


def _run(main: Callable[[], object]) -> None:
    uvloop.run(main())  # type: ignore[arg-type]


def test_a_bulk_stream_yields_the_loop_after_its_budget() -> None:
    """With megabytes waiting in the socket, no turn of the loop reads more than the budget."""

    async def main() -> None:
        turns = 0

        def tick() -> None:
            nonlocal turns
            turns += 1
            if not recorder.eof.is_set():
                loop.call_soon(tick)

        loop = asyncio.get_running_loop()
        stream, recorder, theirs = await _stream_over_socketpair(lambda: turns)
        stream.pause_reading()
        writer = _feed(theirs, 64 * MIB)
        await asyncio.sleep(0.2)  # megabytes pile up in the kernel
        loop.call_soon(tick)
        stream.resume_reading()
        await asyncio.wait_for(recorder.eof.wait(), 60)
        writer.join(10)
        theirs.close()
        assert recorder.total == 64 * MIB
        per_turn = Counter[int]()
        for turn, size in recorder.reads:
            per_turn[turn] += size
        full_reads = sum(1 for _, size in recorder.reads if size == READ_SIZE)
        assert full_reads > 32, "the test never made the loop read whole buffers in a row"
        assert max(per_turn.values()) <= READ_TURN_BUDGET, per_turn.most_common(3)

    _run(main)


def test_a_pause_during_a_yield_holds() -> None:
    """Back-pressure set while the stream has yielded is still in force when its turn ends."""

    async def main() -> None:
        stream, recorder, theirs = await _stream_over_socketpair(lambda: 0)
        stream.pause_reading()
        writer = _feed(theirs, 32 * MIB)
        await asyncio.sleep(0.2)

        def pause_once_yielded(s: Stream) -> None:
            if recorder.total >= READ_TURN_BUDGET:
                recorder.on_chunk = None
                s.pause_reading()

        recorder.on_chunk = pause_once_yielded
        stream.resume_reading()
        await asyncio.sleep(0.5)
        held = recorder.total
        assert READ_TURN_BUDGET <= held < 32 * MIB
        await asyncio.sleep(0.5)  # many turns later: still paused
        assert recorder.total == held
        stream.resume_reading()
        await asyncio.wait_for(recorder.eof.wait(), 60)
        writer.join(10)
        theirs.close()
        assert recorder.total == 32 * MIB

    _run(main)


# -- TlsStream ---------------------------------------------------------------------------

DOMAIN = "r1.localhost"
SERVER_NAME = f"t1.{DOMAIN}"
ALPN = "burrow-test/1"
PLAIN_REPLY = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCertificates:
    return ensure_dev_certificates(tmp_path_factory.mktemp("tls"), DOMAIN)


def _server_context(certs: DevCertificates) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.cert, certs.key)
    context.set_alpn_protocols([ALPN])
    return context


def _client_context(ca: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    context.set_alpn_protocols([ALPN])
    return context


class Collector(BaseReceiver):
    """Keeps what a stream delivers; :meth:`until` waits for a condition on it."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False
        self.closed: tuple[BaseException | None] | None = None
        self._changed = asyncio.Event()

    def on_data(self, stream: Stream, data: Chunk) -> None:
        self.data += data
        self._changed.set()

    def on_eof(self, stream: Stream) -> None:
        self.eof = True
        self._changed.set()

    def on_close(self, stream: Stream, exc: BaseException | None) -> None:
        self.closed = (exc,)
        self._changed.set()

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self._changed.clear()
            await asyncio.wait_for(self._changed.wait(), 10)


class TlsServer:
    """A loopback listener whose connections are TlsStreams; each handshake's outcome queued."""

    def __init__(self, context: ssl.SSLContext, **options: object) -> None:
        self.context = context
        self.options = options
        self.handshakes: asyncio.Queue[tuple[TlsStream, BaseException | None]] = asyncio.Queue()
        self.server: asyncio.Server | None = None

    def _stream(self) -> TlsStream:
        return TlsStream(
            self.context,
            server_side=True,
            on_handshake=lambda stream, exc: self.handshakes.put_nowait((stream, exc)),
            **self.options,  # type: ignore[arg-type]
        )

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._stream, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def handshake(self) -> tuple[TlsStream, BaseException | None]:
        return await asyncio.wait_for(self.handshakes.get(), 10)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def _tls_client(port: int, context: ssl.SSLContext) -> tuple[TlsStream, BaseException | None]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[BaseException | None] = loop.create_future()

    def on_handshake(stream: TlsStream, exc: BaseException | None) -> None:
        done.set_result(exc)

    _, stream = await loop.create_connection(
        lambda: TlsStream(
            context, server_side=False, server_hostname=SERVER_NAME, on_handshake=on_handshake
        ),
        "127.0.0.1",
        port,
    )
    return stream, await asyncio.wait_for(done, 10)


async def _connected(
    certs: DevCertificates,
) -> tuple[TlsServer, TlsStream, Collector, TlsStream, Collector]:
    """A finished handshake: (server, its stream, what it got, client stream, what it got)."""
    server = TlsServer(_server_context(certs))
    port = await server.start()
    client, client_error = await _tls_client(port, _client_context(certs.ca_cert))
    assert client_error is None
    accepted, server_error = await server.handshake()
    assert server_error is None
    assert client.handshake_done and accepted.handshake_done
    at_server, at_client = Collector(), Collector()
    accepted.set_receiver(at_server)
    client.set_receiver(at_client)
    return server, accepted, at_server, client, at_client


def test_tls_carries_data_both_ways(certs: DevCertificates) -> None:
    """A megabyte each way (many TLS records), byte for byte, and ALPN agreed."""

    async def main() -> None:
        server, accepted, at_server, client, at_client = await _connected(certs)
        assert client.alpn == accepted.alpn == ALPN
        upload = bytes(range(256)) * 4096
        download = upload[::-1]
        client.write(upload)
        accepted.write(memoryview(download))
        await at_server.until(lambda: len(at_server.data) >= len(upload))
        await at_client.until(lambda: len(at_client.data) >= len(download))
        assert at_server.data == upload
        assert at_client.data == download
        assert not at_server.eof and not at_client.eof
        client.close()  # close_notify, then FIN: an end of stream for the server
        await at_server.until(lambda: at_server.eof)
        assert at_server.closed is None
        accepted.close()
        await at_server.until(lambda: at_server.closed is not None)
        assert at_server.closed == (None,)
        server.close()

    _run(main)


def test_tls_half_close_with_close_notify(certs: DevCertificates) -> None:
    """The client's write_eof ends its direction only; the server answers, then ends its own."""

    async def main() -> None:
        server, accepted, at_server, client, at_client = await _connected(certs)
        client.write(b"request")
        client.write_eof()
        await at_server.until(lambda: at_server.eof)
        assert at_server.data == b"request"
        assert at_server.closed is None, "a half-close closed the connection"
        client.write(b"too late")  # after our EOF: dropped, never sent
        accepted.write(b"reply after the client's EOF")
        await at_client.until(lambda: len(at_client.data) >= 28)
        assert at_client.data == b"reply after the client's EOF"
        assert not at_client.eof
        accepted.write_eof()
        await at_client.until(lambda: at_client.eof)
        assert at_client.closed is None
        assert at_server.data == b"request"
        client.close()
        accepted.close()
        await at_client.until(lambda: at_client.closed is not None)
        server.close()

    _run(main)


def test_tls_bare_fin_is_a_half_close(certs: DevCertificates) -> None:
    """A TCP FIN without close_notify ends the peer's direction, not the connection."""

    async def main() -> None:
        server, accepted, at_server, client, at_client = await _connected(certs)
        client.write(b"request")
        assert client.transport is not None
        client.transport.write_eof()  # FIN, no close_notify
        await at_server.until(lambda: at_server.eof)
        assert at_server.data == b"request"
        accepted.write(b"reply")
        accepted.write_eof()
        await at_client.until(lambda: at_client.eof)
        assert at_client.data == b"reply"
        assert at_client.closed is None and at_server.closed is None
        accepted.close()
        client.transport.close()  # not client.close(): no close_notify after our FIN
        await at_client.until(lambda: at_client.closed is not None)
        server.close()

    _run(main)


def test_tls_handshake_timeout(certs: DevCertificates) -> None:
    """A peer that connects and says nothing is closed, and the handshake fails with a timeout."""

    async def main() -> None:
        server = TlsServer(_server_context(certs), handshake_timeout=0.05)
        port = await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        accepted, error = await server.handshake()
        assert isinstance(error, TimeoutError)
        assert not accepted.handshake_done
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        server.close()

    _run(main)


def test_plain_http_to_the_tls_port_gets_the_plain_reply(certs: DevCertificates) -> None:
    async def main() -> None:
        server = TlsServer(_server_context(certs), plain_reply=PLAIN_REPLY)
        port = await server.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: t1.r1.localhost\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 10) == PLAIN_REPLY
        _, error = await server.handshake()
        assert isinstance(error, ssl.SSLError)
        writer.close()
        server.close()

    _run(main)


def test_a_tls_client_gets_no_plain_reply(certs: DevCertificates) -> None:
    """The plain reply is for plain text only: a TLS client on the same server gets TLS."""

    async def main() -> None:
        server = TlsServer(_server_context(certs), plain_reply=PLAIN_REPLY)
        port = await server.start()
        client, error = await _tls_client(port, _client_context(certs.ca_cert))
        assert error is None
        _, server_error = await server.handshake()
        assert server_error is None
        client.close()
        server.close()

    _run(main)


def test_an_untrusted_certificate_fails_both_handshakes(
    certs: DevCertificates, tmp_path: Path
) -> None:
    other_ca = ensure_dev_certificates(tmp_path / "other", DOMAIN).ca_cert

    async def main() -> None:
        server = TlsServer(_server_context(certs))
        port = await server.start()
        client, error = await _tls_client(port, _client_context(other_ca))
        assert isinstance(error, ssl.SSLCertVerificationError)
        assert not client.handshake_done
        _, server_error = await server.handshake()
        assert server_error is not None
        server.close()

    _run(main)
