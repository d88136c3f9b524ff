"""Integrity under load, resets and half-closes passing through, and what a slow visitor costs.

The relay (``burrow dev``) and the agent (``burrow forward PORT --tcp``) run
as processes of their own, as users run them, over the default TLS agent link.
The local server and the visitors run in the test process: the server (in a
thread, on its own event loop) hashes what each connection sends it and
answers with a deterministic stream, so both ends of every stream can compare
SHA-256 digests.

Every connection starts with a header naming what the server should do:
``dupx`` (read and write at once), ``aeof`` (read to the visitor's EOF, then
answer: a half-close that must not lose the answer), ``push`` (write up to
1 GiB as fast as the visitor lets it), ``rstl`` (write a little, then reset),
``wait`` (read until the visitor's EOF or reset, and say which).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import random
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pytest
from devrelay import BURROW, dev_relay, stop

from burrow.net.stream import READ_SIZE, TLS_READ_SIZE, WRITE_HIGH_WATER

MIB: Final = 1024 * 1024

# -- integrity ------------------------------------------------------------------------

STREAMS: Final = 64  # at once: half through the https:// address, half through raw TCP
STREAM_SIZE: Final = 64 * MIB  # each way, per stream
CHUNK: Final = 256 * 1024

# One stream must never take this long; it only keeps a stuck data path from
# hanging the run (the 64 streams together take about 30 s on 2 cores).
STREAM_TIMEOUT: Final = 180.0

# -- back-pressure ----------------------------------------------------------------------

PUSH_LIMIT: Final = 1024 * MIB  # what the local server offers a slow visitor
SLOW_READ_RATE: Final = 1 * MIB  # bytes per second the slow visitor reads
SLOW_READ_SECONDS: Final = 15.0
SAMPLE_EVERY: Final = 0.5

# What a relay or an agent may grow by while a visitor reads at 1 MiB/s and the
# local server offers 1 GiB. Per stream, each process holds at most one
# transport's write buffer up to WRITE_HIGH_WATER (512 KiB) plus what one read
# adds on top (256 KiB of socket read, 256 KiB of decrypted or encrypted TLS
# records), about 1 MiB; the socket buffers in between are kernel memory, not
# RSS. The rest is headroom for the allocator's arenas and the interpreter
# (a relay that stopped pushing back would grow by hundreds of MiB instead).
RSS_GROWTH_BOUND: Final = 16 * MIB
PER_STREAM_HOLD: Final = WRITE_HIGH_WATER + READ_SIZE + TLS_READ_SIZE

HEADER: Final = struct.Struct("!4s4sQ")  # magic, mode, stream id
MAGIC: Final = b"BRW1"

# Deterministic content: stream i's chunk j is a slice of one random pool at an
# offset that depends on i, j and the direction, so every stream differs and
# nothing is generated while streaming.
_POOL_SIZE: Final = 8 * MIB
_POOL: Final = memoryview(random.Random(20261123).randbytes(_POOL_SIZE + CHUNK))


def stream_chunks(stream_id: int, direction: int, size: int) -> Iterator[memoryview]:
    """The bytes of one direction (0 up, 1 down) of stream ``stream_id``, in chunks."""
    for j in range(size // CHUNK):
        offset = (stream_id * 2_654_435_761 + j * 40_503 + direction * 1_234_567) % _POOL_SIZE
        yield _POOL[offset : offset + CHUNK]


def stream_sha256(stream_id: int, direction: int, size: int) -> str:
    digest = hashlib.sha256()
    for chunk in stream_chunks(stream_id, direction, size):
        digest.update(chunk)
    return digest.hexdigest()


# ======================================================================================
# The local server
# ======================================================================================


@dataclass
class Record:
    """What the local server saw of one connection."""

    ended: str = "open"  # "eof" or "reset", for what the visitor sent
    received: int = 0
    received_sha256: str = ""
    sent: int = 0  # handed to the kernel
    sent_sha256: str = ""


class LocalServer:
    """The tunnel's local server, on its own event loop in a thread."""

    def __init__(self) -> None:
        self.port = 0
        self._lock = threading.Lock()
        self._records: dict[int, concurrent.futures.Future[Record]] = {}
        self._progress: dict[int, Record] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def result(self, stream_id: int) -> concurrent.futures.Future[Record]:
        """The record of ``stream_id``, once the server is done with it."""
        with self._lock:
            return self._records.setdefault(stream_id, concurrent.futures.Future())

    def progress(self, stream_id: int) -> Record:
        """The record of ``stream_id`` as it stands now."""
        with self._lock:
            return self._progress.setdefault(stream_id, Record())

    def __enter__(self) -> LocalServer:
        started: concurrent.futures.Future[int] = concurrent.futures.Future()

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=MIB)
            started.set_result(server.sockets[0].getsockname()[1])
            async with server:
                await self._stop.wait()

        def run() -> None:
            import uvloop

            uvloop.run(main())

        self._thread = threading.Thread(target=run, name="integrity-server", daemon=True)
        self._thread.start()
        self.port = started.result(timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            magic, mode, stream_id = HEADER.unpack(await reader.readexactly(HEADER.size))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        assert magic == MAGIC, magic
        record = self.progress(stream_id)
        try:
            if mode in (b"dupx", b"aeof"):
                await self._integrity(reader, writer, stream_id, record, mode == b"aeof")
            elif mode == b"push":
                await self._push(reader, writer, stream_id, record)
            elif mode == b"rstl":
                await self._reset(writer, stream_id, record)
            elif mode == b"wait":
                await self._receive(reader, record)
        except ConnectionError:
            record.ended = "reset"
        finally:
            writer.close()
            self.result(stream_id).set_result(record)

    async def _receive(self, reader: asyncio.StreamReader, record: Record) -> None:
        digest = hashlib.sha256()
        try:
            while data := await reader.read(MIB):
                digest.update(data)
                record.received += len(data)
        finally:
            record.received_sha256 = digest.hexdigest()
        record.ended = "eof"

    async def _send(
        self, writer: asyncio.StreamWriter, stream_id: int, record: Record, size: int
    ) -> None:
        digest = hashlib.sha256()
        for chunk in stream_chunks(stream_id, 1, size):
            digest.update(chunk)
            writer.write(chunk)
            await writer.drain()
            record.sent = record.sent + CHUNK
        record.sent_sha256 = digest.hexdigest()

    async def _integrity(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        stream_id: int,
        record: Record,
        after_eof: bool,
    ) -> None:
        if after_eof:  # the visitor has half-closed before a single byte comes back
            await self._receive(reader, record)
            await self._send(writer, stream_id, record, STREAM_SIZE)
        else:
            await asyncio.gather(
                self._receive(reader, record),
                self._send(writer, stream_id, record, STREAM_SIZE),
            )
        writer.write_eof()
        await writer.drain()

    async def _push(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        stream_id: int,
        record: Record,
    ) -> None:
        transport = writer.transport
        for chunk in stream_chunks(stream_id, 1, PUSH_LIMIT):
            if transport.is_closing():
                break
            writer.write(chunk)
            record.sent += len(chunk)
            try:
                await writer.drain()
            except ConnectionError:
                break
        record.sent -= transport.get_write_buffer_size()  # not yet in the kernel
        record.ended = "pushed"

    async def _reset(self, writer: asyncio.StreamWriter, stream_id: int, record: Record) -> None:
        await self._send(writer, stream_id, record, MIB)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        record.ended = "reset sent"


# ======================================================================================
# The relay and the agent, as processes
# ======================================================================================


@dataclass
class Tunnels:
    relay: subprocess.Popen[bytes]
    agent: subprocess.Popen[bytes]
    ca: str
    https_host: str
    https_port: int
    tcp_port: int
    logs: dict[str, Path] = field(default_factory=dict)

    def visitor_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca)

    def assert_quiet_logs(self) -> None:
        """Neither process logged an error or a traceback."""
        for name, path in self.logs.items():
            text = path.read_text(errors="replace")
            bad = [line for line in text.splitlines() if " ERROR " in line or "Traceback" in line]
            assert bad == [], f"{name}: {bad[:20]}"


@contextlib.contextmanager
def tunnel_processes(tmp: Path, local_port: int) -> Iterator[Tunnels]:
    """``burrow dev`` on a free port, and ``burrow forward local_port --tcp`` using it."""
    agent_log = tmp / "agent.log"
    with dev_relay(tmp, "--log-level", "warning") as relay, agent_log.open("wb") as log:
        agent = subprocess.Popen(
            [*BURROW, "forward", str(local_port), "--tcp"],
            env=relay.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        try:
            assert agent.stdout is not None
            url = agent.stdout.readline().decode().strip()
            tcp = agent.stdout.readline().decode().strip()
            assert url.startswith("https://") and tcp.startswith("tcp://"), (url, tcp)
            host, _, port = url.removeprefix("https://").rpartition(":")
            yield Tunnels(
                relay=relay.process,
                agent=agent,
                ca=relay.ca,
                https_host=host,
                https_port=int(port),
                tcp_port=int(tcp.rpartition(":")[2]),
                logs={"relay": relay.log, "agent": agent_log},
            )
        finally:
            stop(agent)


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    with LocalServer() as local:
        yield local


@pytest.fixture(scope="module")
def tunnels(server: LocalServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tunnels]:
    with tunnel_processes(tmp_path_factory.mktemp("integrity"), server.port) as running:
        yield running
        running.assert_quiet_logs()


_next_id = iter(range(1_000_000, 10**9))


def new_stream_id() -> int:
    return next(_next_id)


# ======================================================================================
# Visitors
# ======================================================================================


class TlsVisitor:
    """A visitor of the https:// address that can half-close: TLS over memory BIOs."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls: ssl.SSLObject
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.tls = tls
        self.peer_close_notify = False

    @classmethod
    async def connect(cls, tunnels: Tunnels) -> TlsVisitor:
        reader, writer = await asyncio.open_connection("127.0.0.1", tunnels.https_port, limit=MIB)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = tunnels.visitor_context().wrap_bio(
            incoming, outgoing, server_hostname=tunnels.https_host
        )
        visitor = cls(reader, writer, tls)
        visitor._incoming, visitor._outgoing = incoming, outgoing
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                writer.write(outgoing.read())
                data = await reader.read(65536)
                if not data:
                    raise EOFError("EOF in the TLS handshake") from None
                incoming.write(data)
        writer.write(outgoing.read())
        return visitor

    _incoming: ssl.MemoryBIO
    _outgoing: ssl.MemoryBIO

    async def send(self, data: bytes | memoryview) -> None:
        self.tls.write(data)
        self.writer.write(self._outgoing.read())
        await self.writer.drain()

    async def write_eof(self, close_notify: bool = True) -> None:
        """Our half-close: a TLS close_notify, or a bare TCP FIN."""
        if close_notify:
            with contextlib.suppress(ssl.SSLError):
                self.tls.unwrap()  # sends close_notify; the relay's comes later
            self.writer.write(self._outgoing.read())
        else:
            self.writer.write_eof()
        await self.writer.drain()

    async def read(self) -> bytes:
        """Some decrypted bytes; b"" once the stream has ended."""
        while True:
            try:
                data = self.tls.read(MIB)
                # b"" is the peer's close_notify while ours is unsent (SSLZeroReturnError after).
                if not data:
                    self.peer_close_notify = True
                return data
            except ssl.SSLWantReadError:
                data = await self.reader.read(MIB)
                if not data:
                    return b""
                self._incoming.write(data)
            except ssl.SSLZeroReturnError:
                self.peer_close_notify = True
                return b""

    def close(self) -> None:
        self.writer.close()


class TcpVisitor:
    """A visitor of the raw TCP port."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, tunnels: Tunnels) -> TcpVisitor:
        reader, writer = await asyncio.open_connection("127.0.0.1", tunnels.tcp_port, limit=MIB)
        return cls(reader, writer)

    async def send(self, data: bytes | memoryview) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def write_eof(self, close_notify: bool = True) -> None:
        self.writer.write_eof()
        await self.writer.drain()

    async def read(self) -> bytes:
        return await self.reader.read(MIB)

    def close(self) -> None:
        self.writer.close()


@dataclass
class StreamResult:
    stream_id: int
    kind: str
    mode: str
    sent: int = 0
    sent_sha256: str = ""
    received: int = 0
    received_sha256: str = ""
    ended_cleanly: bool = False


async def run_stream(
    tunnels: Tunnels, stream_id: int, kind: str, mode: str, close_notify: bool
) -> StreamResult:
    """One visitor: STREAM_SIZE up, STREAM_SIZE down, both hashed as they pass."""
    result = StreamResult(stream_id, kind, mode)
    visitor: TlsVisitor | TcpVisitor = await (
        TlsVisitor.connect(tunnels) if kind == "https" else TcpVisitor.connect(tunnels)
    )
    try:
        await visitor.send(HEADER.pack(MAGIC, mode.encode(), stream_id))

        async def upload() -> None:
            digest = hashlib.sha256()
            for chunk in stream_chunks(stream_id, 0, STREAM_SIZE):
                digest.update(chunk)
                await visitor.send(chunk)
                result.sent += len(chunk)
            result.sent_sha256 = digest.hexdigest()
            await visitor.write_eof(close_notify)

        async def download() -> None:
            digest = hashlib.sha256()
            while data := await visitor.read():
                digest.update(data)
                result.received += len(data)
            result.received_sha256 = digest.hexdigest()
            result.ended_cleanly = not isinstance(visitor, TlsVisitor) or visitor.peer_close_notify

        async with asyncio.timeout(STREAM_TIMEOUT):
            await asyncio.gather(upload(), download())
    finally:
        visitor.close()
    return result


# ======================================================================================
# Tests
# ======================================================================================


@pytest.mark.timeout(300)
async def test_64_streams_of_64_mib_each_way_arrive_whole(
    tunnels: Tunnels, server: LocalServer
) -> None:
    """64 visitors at once, half HTTPS (TLS ends at the relay) and half raw TCP, each sending
    64 MiB and receiving 64 MiB; half of them half-close first and get their 64 MiB only
    after (HTTPS ones by close_notify or by a bare FIN). SHA-256 agrees at both ends."""
    plan = []
    for i in range(STREAMS):
        kind = "https" if i % 2 == 0 else "tcp"
        mode = "dupx" if (i // 2) % 2 == 0 else "aeof"
        plan.append((new_stream_id(), kind, mode, (i // 4) % 2 == 0))
    started = time.monotonic()
    results = await asyncio.gather(
        *(run_stream(tunnels, sid, kind, mode, notify) for sid, kind, mode, notify in plan)
    )
    elapsed = time.monotonic() - started
    records = [await asyncio.wrap_future(server.result(sid)) for sid, _, _, _ in plan]
    for result, record in zip(results, records, strict=True):
        where = f"stream {result.stream_id} ({result.kind}, {result.mode})"
        assert result.sent == STREAM_SIZE, where
        assert record.ended == "eof", where
        assert record.received == STREAM_SIZE, where
        assert record.received_sha256 == result.sent_sha256, where
        assert record.sent == STREAM_SIZE, where
        assert result.received == STREAM_SIZE, where
        assert result.received_sha256 == record.sent_sha256, where
        assert result.ended_cleanly, f"{where}: TLS ended without the relay's close_notify"
    # Both directions of every stream differ from every other stream's.
    assert len({r.sent_sha256 for r in results} | {r.received_sha256 for r in results}) == 128
    total = 2 * STREAMS * STREAM_SIZE
    print(
        f"\n{STREAMS} streams, {total / MIB / 1024:.0f} GiB hashed at both ends in {elapsed:.1f}s"
    )


async def _connect(
    tunnels: Tunnels | None, kind: str, server: LocalServer
) -> TlsVisitor | TcpVisitor:
    """A visitor of the tunnel's https:// address or TCP port, or (``"direct"``) of the
    local server itself, to show what the same peer sees without a tunnel."""
    if kind == "direct":
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port, limit=MIB)
        return TcpVisitor(reader, writer)
    assert tunnels is not None
    return await (TlsVisitor.connect(tunnels) if kind == "https" else TcpVisitor.connect(tunnels))


async def visitor_resets(tunnels: Tunnels | None, server: LocalServer, kind: str) -> Record:
    """The visitor sends 100,000 bytes, then resets; what the local server saw."""
    stream_id = new_stream_id()
    visitor = await _connect(tunnels, kind, server)
    await visitor.send(HEADER.pack(MAGIC, b"wait", stream_id) + b"x" * 100_000)
    deadline = time.monotonic() + 30
    while server.progress(stream_id).received < 100_000:  # the whole path is joined
        assert time.monotonic() < deadline, "the local server never got the bytes"
        await asyncio.sleep(0.01)
    # Linger 0: closing sends a reset.
    sock = visitor.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    visitor.writer.transport.abort()
    return await asyncio.wait_for(asyncio.wrap_future(server.result(stream_id)), 30)


async def local_resets(
    tunnels: Tunnels | None, server: LocalServer, kind: str
) -> tuple[str, int, bool]:
    """The local server sends 1 MiB, then resets: how the visitor's stream ended
    ("reset" or "eof"), the bytes it got, and whether TLS said the stream was whole."""
    stream_id = new_stream_id()
    visitor = await _connect(tunnels, kind, server)
    try:
        await visitor.send(HEADER.pack(MAGIC, b"rstl", stream_id))
        received = 0
        ending = "eof"
        async with asyncio.timeout(30):
            try:
                while data := await visitor.read():
                    received += len(data)
            except ConnectionResetError:
                ending = "reset"
        record = await asyncio.wait_for(asyncio.wrap_future(server.result(stream_id)), 30)
        assert record.ended == "reset sent"
    finally:
        visitor.close()
    close_notify = isinstance(visitor, TlsVisitor) and visitor.peer_close_notify
    return ending, received, close_notify


async def test_resets_are_seen_as_resets_without_a_tunnel(server: LocalServer) -> None:
    """The control for the two tests below: the same peers, no tunnel in between."""
    assert (await visitor_resets(None, server, "direct")).ended == "reset"
    ending, received, _ = await local_resets(None, server, "direct")
    assert ending == "reset", received


# Splice.on_close passes a reset on with Stream.abort(), which is asyncio's
# transport.abort(): the socket is closed at once, but with a FIN, not a reset
# (only the kernel-splice path sets SO_LINGER 0). The data connection then
# looks half-closed to the other side, which passes a clean EOF on.


@pytest.mark.parametrize("kind", ["https", "tcp"])
async def test_visitor_reset_reaches_the_local_server_as_a_reset(
    tunnels: Tunnels, server: LocalServer, kind: str
) -> None:
    record = await visitor_resets(tunnels, server, kind)
    assert record.ended == "reset", record


@pytest.mark.parametrize("kind", ["https", "tcp"])
async def test_local_reset_reaches_the_visitor_as_a_reset(
    tunnels: Tunnels, server: LocalServer, kind: str
) -> None:
    ending, received, close_notify = await local_resets(tunnels, server, kind)
    assert received <= MIB
    # A close_notify (or a clean FIN) tells the visitor the stream ended whole.
    assert not close_notify, f"a local reset became a TLS close_notify after {received} bytes"
    assert ending == "reset", f"the visitor saw a clean end after {received} bytes"


@pytest.mark.parametrize("kind", ["https", "tcp"])
async def test_half_close_then_everything_still_arrives(
    tunnels: Tunnels, server: LocalServer, kind: str
) -> None:
    """The visitor sends a little and half-closes at once; the whole answer still comes."""
    stream_id = new_stream_id()
    visitor = await _connect(tunnels, kind, server)
    try:
        await visitor.send(HEADER.pack(MAGIC, b"aeof", stream_id) + b"question")
        await visitor.write_eof()
        digest, received = hashlib.sha256(), 0
        async with asyncio.timeout(STREAM_TIMEOUT):
            while data := await visitor.read():
                digest.update(data)
                received += len(data)
    finally:
        visitor.close()
    record = await asyncio.wait_for(asyncio.wrap_future(server.result(stream_id)), 30)
    assert (record.ended, record.received) == ("eof", len(b"question"))
    assert received == STREAM_SIZE
    assert digest.hexdigest() == stream_sha256(stream_id, 1, STREAM_SIZE)


# -- back-pressure: a slow visitor costs the relay and the agent bounded memory ---------


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def kernel_buffer_bound(hops: int) -> int:
    """Most bytes the kernel may hold on ``hops`` loopback TCP connections (as in test_pump)."""
    rmem = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
    wmem = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    return hops * (rmem + wmem)


def _visitor_socket(tunnels: Tunnels, kind: str) -> socket.socket:
    if kind == "tcp":
        return socket.create_connection(("127.0.0.1", tunnels.tcp_port), timeout=30)
    raw = socket.create_connection(("127.0.0.1", tunnels.https_port), timeout=30)
    return tunnels.visitor_context().wrap_socket(raw, server_hostname=tunnels.https_host)


def _recv_exactly(sock: socket.socket, n: int) -> None:
    while n:
        data = sock.recv(min(n, 65536))
        assert data, f"EOF with {n} bytes still expected"
        n -= len(data)


@dataclass
class MemoryFigures:
    before: int
    peak: int
    after: int


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["https", "tcp"])
def test_slow_visitor_costs_bounded_memory(tmp_path: Path, kind: str) -> None:
    """A visitor reads at 1 MiB/s for 15 s while the local server offers 1 GiB as fast as
    it can: relay and agent RSS, sampled every 0.5 s, grow by less than RSS_GROWTH_BOUND,
    and the local server is held back (it cannot have pushed more than the kernel
    buffers on the way hold, plus what was read)."""
    with LocalServer() as local, tunnel_processes(tmp_path, local.port) as tunnels:
        pids = {"relay": tunnels.relay.pid, "agent": tunnels.agent.pid}
        # Warm up: a first visitor at full speed, so per-loop buffers and TLS
        # contexts exist before the baseline is taken.
        warm_id = new_stream_id()
        with _visitor_socket(tunnels, kind) as sock:
            sock.sendall(HEADER.pack(MAGIC, b"push", warm_id))
            _recv_exactly(sock, 32 * MIB)
        local.result(warm_id).result(timeout=30)
        before = {name: rss(pid) for name, pid in pids.items()}

        stream_id = new_stream_id()
        peak = dict(before)
        read = 0
        per_tick = int(SLOW_READ_RATE * SAMPLE_EVERY)
        with _visitor_socket(tunnels, kind) as sock:
            sock.sendall(HEADER.pack(MAGIC, b"push", stream_id))
            start = time.monotonic()
            for tick in range(1, int(SLOW_READ_SECONDS / SAMPLE_EVERY) + 1):
                _recv_exactly(sock, per_tick)
                read += per_tick
                for name, pid in pids.items():
                    peak[name] = max(peak[name], rss(pid))
                # Pace the reads: 1 MiB/s, however fast the data is there.
                time.sleep(max(0.0, start + tick * SAMPLE_EVERY - time.monotonic()))
            pushed = local.progress(stream_id).sent
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        record = local.result(stream_id).result(timeout=30)
        after = {name: rss(pid) for name, pid in pids.items()}
        tunnels.assert_quiet_logs()

    figures = {name: MemoryFigures(before[name], peak[name], after[name]) for name in pids}
    print(f"\n{kind}: read {read / MIB:.0f} MiB, the local server pushed {pushed / MIB:.1f} MiB")
    for name, f in figures.items():
        print(
            f"{name}: RSS before {f.before / MIB:.1f} MiB, peak {f.peak / MIB:.1f} MiB "
            f"(+{(f.peak - f.before) / MIB:.1f}), after {f.after / MIB:.1f} MiB"
        )
    for name, f in figures.items():
        assert f.peak - f.before < RSS_GROWTH_BOUND, (name, figures)
    # Held back: what left the local server is what was read plus what fits in
    # the kernel's buffers on three connections and burrow's own per-stream hold.
    assert record.sent <= PUSH_LIMIT
    assert pushed - read <= kernel_buffer_bound(3) + 2 * PER_STREAM_HOLD, (pushed, read)
    assert pushed < PUSH_LIMIT
