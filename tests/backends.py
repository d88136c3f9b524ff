"""Real local servers ("backends") for burrow's end-to-end tests.

Every helper here starts a genuine server bound to 127.0.0.1 (no mocks), yields a small
object describing it (at least ``.port``) and tears it down cleanly on exit::

    with http_server({"a.txt": b"hello"}) as srv:
        urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/a.txt")

Nothing in this module depends on pytest, so it can also be used from scripts and
benchmarks. A missing system binary (sshd, ssh-keygen, ...) raises
:class:`BackendUnavailable` rather than skipping: the test scripts install everything.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import getpass
import hashlib
import http.client
import http.server
import os
import shutil
import socket
import socketserver
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_MARKER",
    "HOST",
    "BackendUnavailable",
    "H2cServer",
    "HttpServer",
    "SshdServer",
    "TcpEchoServer",
    "WebSocketEchoServer",
    "big_chunks",
    "big_sha256",
    "free_port",
    "h2c_server",
    "http_server",
    "sshd_server",
    "tcp_echo_server",
    "wait_for_port",
    "websocket_echo_server",
]

HOST = "127.0.0.1"
DEFAULT_MARKER = "burrow-backend-marker-7f3c2a"
BIG_CHUNK = 64 * 1024
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0


class BackendUnavailable(RuntimeError):
    """A backend could not be started (missing binary, failed start-up, ...)."""


# --------------------------------------------------------------------------- helpers


def free_port(host: str = HOST) -> int:
    """Return a TCP port on ``host`` that was free a moment ago (bind port 0, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def free_port_on_both() -> int:
    """A port free on both 127.0.0.1 and ::1 (for a listener on each)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET6) as v6:
            v6.bind(("::1", 0))
            port: int = v6.getsockname()[1]
            with socket.socket(socket.AF_INET) as v4:
                try:
                    v4.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise AssertionError("no port free on both 127.0.0.1 and ::1")


def client_hello(
    server_name: str | None,
    alpn: Sequence[str] = (),
    maximum_version: ssl.TLSVersion | None = None,
) -> bytes:
    """The first bytes Python's ssl sends as a client: its ClientHello, in records."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if maximum_version is not None:
        context.maximum_version = maximum_version
    if alpn:
        context.set_alpn_protocols(list(alpn))
    outgoing = ssl.MemoryBIO()
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        return outgoing.read()
    raise AssertionError("a TLS client finished its handshake with no server")


def wait_for_port(
    port: int,
    host: str = HOST,
    timeout: float = _START_TIMEOUT,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Poll-connect to ``host:port`` until it accepts or ``timeout`` seconds pass.

    ``alive`` (optional) is checked between attempts; when it returns False we give up
    early (e.g. the server process exited).
    """
    deadline = time.monotonic() + timeout
    delay = 0.005
    last_error: OSError | None = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as exc:
            last_error = exc
        if alive is not None and not alive():
            raise BackendUnavailable(f"server on {host}:{port} died before accepting")
        if time.monotonic() >= deadline:
            raise BackendUnavailable(
                f"nothing accepted connections on {host}:{port} within {timeout}s: {last_error}"
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _require_binary(path_or_name: str, package: str) -> str:
    found = (
        path_or_name
        if os.path.isabs(path_or_name) and os.access(path_or_name, os.X_OK)
        else shutil.which(path_or_name)
    )
    if not found:
        raise BackendUnavailable(
            f"{path_or_name!r} not found: install the Debian package {package!r} "
            f"(apt-get install -y {package}; scripts/test does this)"
        )
    return found


class _ConnectionTrackingMixin:
    """For socketserver servers: remember live connections so close() can end them.

    ThreadingMixIn only joins handler threads; a keep-alive client would keep one
    alive forever. On close we shut every live connection down, then join.
    """

    def _tracking_init(self) -> None:
        self._live_lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._handler_threads: set[threading.Thread] = set()

    def track(self, conn: socket.socket) -> None:
        with self._live_lock:
            self._live.add(conn)
            self._handler_threads.add(threading.current_thread())

    def untrack(self, conn: socket.socket) -> None:
        with self._live_lock:
            self._live.discard(conn)
            self._handler_threads.discard(threading.current_thread())

    def close_live_connections(self, join_timeout: float = _STOP_TIMEOUT) -> None:
        with self._live_lock:
            live = list(self._live)
            threads = list(self._handler_threads)
        for conn in live:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + join_timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))


@contextlib.contextmanager
def _serve_in_thread(server: socketserver.BaseServer, name: str) -> Iterator[None]:
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=name, daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        thread.join(_STOP_TIMEOUT)
        server.server_close()
        if isinstance(server, _ConnectionTrackingMixin):
            server.close_live_connections()


# --------------------------------------------------------------------------- HTTP/1.1


def big_chunks(size: int, chunk: int = BIG_CHUNK) -> Iterator[bytes]:
    """Deterministic pseudo-random content of ``size`` bytes, in pieces.

    Block ``i`` (``BIG_CHUNK`` bytes) is SHAKE-256 of ``b"burrow-big:" + i`` (8 bytes,
    big endian); the stream is those blocks concatenated and cut at ``size``. ``chunk``
    only changes how the same bytes are split up.
    """
    if size < 0:
        raise ValueError("size must be >= 0")
    pending = b""
    produced = 0
    index = 0
    while produced < size:
        while len(pending) < chunk and produced + len(pending) < size:
            block = hashlib.shake_256(b"burrow-big:" + index.to_bytes(8, "big")).digest(BIG_CHUNK)
            index += 1
            pending += block
        piece = pending[: min(chunk, size - produced)]
        pending = pending[len(piece) :]
        produced += len(piece)
        yield piece


def big_sha256(size: int) -> str:
    """Hex SHA-256 of what ``GET /big?size=<size>`` returns."""
    h = hashlib.sha256()
    for piece in big_chunks(size):
        h.update(piece)
    return h.hexdigest()


def _index_html(marker: str, names: list[str]) -> bytes:
    links = "".join(f'<li><a href="/{n}">{n}</a></li>' for n in names)
    return (
        '<!doctype html>\n<html><head><meta charset="utf-8"><title>burrow backend</title>'
        f"</head><body><h1>{marker}</h1><ul>{links}</ul></body></html>\n"
    ).encode()


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "burrow-test-backend/1"
    # Idle keep-alive connections are dropped after this many seconds.
    timeout = 60
    server: _ThreadingHttpServer

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def _send(self, status: int, body: bytes, content_type: str, head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            while True:
                line = self.rfile.readline(65537)
                n = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if n == 0:
                    # trailers until the empty line
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(n))
                self.rfile.readline(3)  # CRLF after the chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _get(self, head: bool) -> None:
        url = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(url.path)
        self.server.count_request()
        if path == "/":
            body = _index_html(self.server.marker, sorted(self.server.files))
            self._send(200, body, "text/html; charset=utf-8", head)
        elif path == "/big":
            query = urllib.parse.parse_qs(url.query)
            try:
                size = int(query.get("size", ["0"])[0])
                if size < 0:
                    raise ValueError
            except ValueError:
                self._send(400, b"bad size\n", "text/plain", head)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            if not head:
                for piece in big_chunks(size):
                    self.wfile.write(piece)
        elif path == "/headers":
            lines = "".join(f"{k}: {v}\n" for k, v in self.headers.items())
            self._send(200, lines.encode(), "text/plain; charset=utf-8", head)
        elif path.lstrip("/") in self.server.files:
            body = self.server.files[path.lstrip("/")]
            self._send(200, body, "application/octet-stream", head)
        else:
            self._send(404, b"not found\n", "text/plain", head)

    def do_GET(self) -> None:
        self._get(head=False)

    def do_HEAD(self) -> None:
        self._get(head=True)

    def do_POST(self) -> None:
        body = self._read_body()
        self.server.count_request()
        if urllib.parse.urlsplit(self.path).path == "/echo":
            ctype = self.headers.get("Content-Type", "application/octet-stream")
            self._send(200, body, ctype)
        else:
            self._send(404, b"not found\n", "text/plain")


class _ThreadingHttpServer(_ConnectionTrackingMixin, http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 512  # listen backlog: 100+ clients may connect at once

    def __init__(self, files: dict[str, bytes], marker: str, verbose: bool) -> None:
        self._tracking_init()
        self.files = files
        self.marker = marker
        self.verbose = verbose
        self._count_lock = threading.Lock()
        self.requests_served = 0
        super().__init__((HOST, 0), _HttpHandler)

    def count_request(self) -> None:
        with self._count_lock:
            self.requests_served += 1


@dataclass
class HttpServer:
    """A running :func:`http_server`."""

    port: int
    marker: str
    files: dict[str, bytes]
    _server: _ThreadingHttpServer = field(repr=False)
    host: str = HOST

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def requests_served(self) -> int:
        return self._server.requests_served


@contextlib.contextmanager
def http_server(
    files: dict[str, bytes] | None = None,
    marker: str = DEFAULT_MARKER,
    verbose: bool = False,
) -> Iterator[HttpServer]:
    """Threaded HTTP/1.1 keep-alive server on 127.0.0.1:<random port>.

    Routes (all responses carry Content-Length):

    - ``GET /``: small HTML page containing ``marker`` (and links to ``files``)
    - ``GET /<name>``: ``files[name]``
    - ``GET /big?size=N``: N bytes of :func:`big_chunks`, streamed in 64 KiB pieces
    - ``GET /headers``: the request headers, one ``Name: value`` per line
    - ``POST /echo``: the request body (Content-Length or chunked) with its Content-Type
    - anything else: 404. ``HEAD`` works for every GET route.
    """
    server = _ThreadingHttpServer(dict(files or {}), marker, verbose)
    port: int = server.server_address[1]
    with _serve_in_thread(server, f"http-backend-{port}"):
        yield HttpServer(port=port, marker=marker, files=server.files, _server=server)


# --------------------------------------------------------------------------- TCP echo


class _EchoHandler(socketserver.BaseRequestHandler):
    server: _ThreadingEchoServer
    request: socket.socket

    def handle(self) -> None:
        conn = self.request
        self.server.track(conn)
        try:
            while True:
                try:
                    data = conn.recv(256 * 1024)
                except OSError:
                    return
                if not data:
                    break  # client half-closed: everything read has been echoed
                self.server.add_bytes(len(data))
                try:
                    conn.sendall(data)
                except OSError:
                    return
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)
            # Wait (briefly) for the client to close its side so the FIN/ACK exchange
            # completes before our close(), which avoids an RST on unread data.
            with contextlib.suppress(OSError):
                conn.settimeout(_STOP_TIMEOUT)
                while conn.recv(65536):
                    pass
        finally:
            self.server.untrack(conn)


class _ThreadingEchoServer(_ConnectionTrackingMixin, socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 512

    def __init__(self) -> None:
        self._tracking_init()
        self._bytes_lock = threading.Lock()
        self.bytes_echoed = 0
        self.connections = 0
        super().__init__((HOST, 0), _EchoHandler)

    def add_bytes(self, n: int) -> None:
        with self._bytes_lock:
            self.bytes_echoed += n

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._bytes_lock:
            self.connections += 1
        super().process_request(request, client_address)


@dataclass
class TcpEchoServer:
    """A running :func:`tcp_echo_server`."""

    port: int
    _server: _ThreadingEchoServer = field(repr=False)
    host: str = HOST

    @property
    def bytes_echoed(self) -> int:
        return self._server.bytes_echoed

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        return self._server.connections


@contextlib.contextmanager
def tcp_echo_server() -> Iterator[TcpEchoServer]:
    """Threaded TCP echo server on 127.0.0.1:<random port>.

    Echoes every byte; when the client half-closes (EOF), it finishes writing, then
    shuts down its own write side, so the client reads every reply and then EOF.
    """
    server = _ThreadingEchoServer()
    port: int = server.server_address[1]
    with _serve_in_thread(server, f"tcp-echo-{port}"):
        yield TcpEchoServer(port=port, _server=server)


# --------------------------------------------------------------------------- asyncio servers


@contextlib.contextmanager
def _async_server_thread(
    name: str,
    serve: Callable[[asyncio.Event, Callable[[int], None]], Awaitable[None]],
) -> Iterator[int]:
    """Run ``serve(stop, started)`` in a thread with its own event loop.

    ``serve`` must call ``started(port)`` once it is listening, then return after
    ``stop`` is set. Start-up errors are raised here; the port is yielded.
    """
    port_future: concurrent.futures.Future[int] = concurrent.futures.Future()
    loop_box: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
    failure: list[BaseException] = []

    async def main() -> None:
        stop = asyncio.Event()
        loop_box.append((asyncio.get_running_loop(), stop))
        await serve(stop, port_future.set_result)

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            failure.append(exc)
            if not port_future.done():
                port_future.set_exception(exc)
        else:
            if not port_future.done():
                port_future.set_exception(BackendUnavailable(f"{name} exited before start"))

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        port = port_future.result(timeout=_START_TIMEOUT)
    except concurrent.futures.TimeoutError:
        raise BackendUnavailable(f"{name} did not start within {_START_TIMEOUT}s") from None
    try:
        yield port
    finally:
        loop, stop = loop_box[0]
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(stop.set)
        thread.join(_STOP_TIMEOUT)
        if thread.is_alive():
            raise BackendUnavailable(f"{name} did not stop within {_STOP_TIMEOUT}s")
        if failure:
            raise BackendUnavailable(f"{name} crashed: {failure[0]!r}") from failure[0]


@dataclass
class WebSocketEchoServer:
    """A running :func:`websocket_echo_server`."""

    port: int
    host: str = HOST

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/"


@contextlib.contextmanager
def websocket_echo_server(max_size: int | None = 64 * 1024 * 1024) -> Iterator[WebSocketEchoServer]:
    """``websockets`` echo server (text and binary messages) on 127.0.0.1:<random port>.

    Runs in a background thread with its own asyncio event loop.
    """
    from websockets.asyncio.server import ServerConnection, serve

    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async def run(stop: asyncio.Event, started: Callable[[int], None]) -> None:
        async with serve(echo, HOST, 0, max_size=max_size) as server:
            sockets = list(server.sockets)
            started(sockets[0].getsockname()[1])
            await stop.wait()

    with _async_server_thread("websocket-echo", run) as port:
        yield WebSocketEchoServer(port=port)


# --------------------------------------------------------------------------- h2c (hypercorn)

_Scope = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
_Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def _version_app(scope: _Scope, receive: _Receive, send: _Send) -> None:
    """ASGI app: every HTTP request gets ``http_version=<scope["http_version"]>``."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    while True:  # drain the request body
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            break
    body = f"http_version={scope['http_version']}".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


@dataclass
class H2cServer:
    """A running :func:`h2c_server`."""

    port: int
    host: str = HOST

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"


@contextlib.contextmanager
def h2c_server() -> Iterator[H2cServer]:
    """Hypercorn on 127.0.0.1:<random port>, cleartext, HTTP/1.1 and HTTP/2.

    HTTP/2 works with prior knowledge (``curl --http2-prior-knowledge``): hypercorn's
    HTTP/1.1 parser recognises the ``PRI * HTTP/2.0`` preface and switches to h2.
    ``GET /`` (any path) answers ``http_version=1.1`` or ``http_version=2``.
    """
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        sock.listen(512)
        port: int = sock.getsockname()[1]
    except BaseException:
        sock.close()
        raise

    config = Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn now owns the descriptor
    config.accesslog = None
    config.loglevel = "WARNING"
    config.graceful_timeout = 1.0

    async def run(stop: asyncio.Event, started: Callable[[int], None]) -> None:
        server = asyncio.ensure_future(
            serve(_version_app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
        )
        # The socket already listens; check that hypercorn really answers.
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            if server.done():
                server.result()
                raise BackendUnavailable("hypercorn exited during start-up")
            try:
                reader, writer = await asyncio.open_connection(HOST, port)
                writer.write(b"GET / HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
                reply = await asyncio.wait_for(reader.read(), 5)
                writer.close()
                if b"http_version=1.1" in reply:
                    break
            except (OSError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                stop.set()
                raise BackendUnavailable("hypercorn did not answer the start-up probe")
            await asyncio.sleep(0.01)
        started(port)
        await server

    with _async_server_thread("h2c-hypercorn", run) as bound:
        yield H2cServer(port=bound)


# --------------------------------------------------------------------------- sshd

SSHD = "/usr/sbin/sshd"


@dataclass
class SshdServer:
    """A running :func:`sshd_server`."""

    port: int
    client_key: Path
    host_key: Path
    log_path: Path
    user: str
    host: str = HOST

    def ssh_command(self, host: str, port: int, remote_cmd: str) -> list[str]:
        """argv running ``remote_cmd`` over ssh at ``host:port`` with the test key.

        ``host:port`` may be this sshd or anything forwarding to it (a burrow tunnel).
        """
        return [
            _require_binary("ssh", "openssh-client"),
            "-i",
            str(self.client_key),
            "-p",
            str(port),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "LogLevel=ERROR",
            f"{self.user}@{host}",
            remote_cmd,
        ]


def _ssh_keygen(path: Path, comment: str) -> None:
    keygen = _require_binary("ssh-keygen", "openssh-client")
    for p in (path, path.with_name(path.name + ".pub")):
        p.unlink(missing_ok=True)
    subprocess.run(
        [keygen, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )


def _wait_for_ssh_banner(port: int, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """True once sshd on ``port`` sends its ``SSH-`` banner; False if it exited."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection((HOST, port), timeout=2.0) as s:
                s.settimeout(5.0)
                if s.recv(4).startswith(b"SSH-"):
                    return True
        except OSError:
            pass
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
    return False


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(_STOP_TIMEOUT)


@contextlib.contextmanager
def sshd_server(tmp_path: Path, attempts: int = 5) -> Iterator[SshdServer]:
    """Debian's OpenSSH server on 127.0.0.1:<free port>, key auth only, for this user.

    Fresh host and client ed25519 keys are generated in ``tmp_path``; sshd's config,
    pid file and log (``sshd.log``) live there too.
    """
    sshd = _require_binary(SSHD, "openssh-server")
    tmp_path = Path(tmp_path).resolve()
    tmp_path.mkdir(parents=True, exist_ok=True)
    user = getpass.getuser()

    host_key = tmp_path / "ssh_host_ed25519_key"
    client_key = tmp_path / "client_ed25519"
    _ssh_keygen(host_key, "burrow-test-host")
    _ssh_keygen(client_key, "burrow-test-client")
    authorized_keys = tmp_path / "authorized_keys"
    authorized_keys.write_bytes(client_key.with_name(client_key.name + ".pub").read_bytes())
    authorized_keys.chmod(0o600)
    if os.geteuid() == 0:
        # sshd's privilege-separation directory (normally made by systemd).
        Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)

    log_path = tmp_path / "sshd.log"
    last_log = ""
    for _attempt in range(attempts):
        port = free_port()
        config = tmp_path / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {port}",
                    f"ListenAddress {HOST}",
                    f"HostKey {host_key}",
                    f"PidFile {tmp_path / 'sshd.pid'}",
                    f"AuthorizedKeysFile {authorized_keys}",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "AllowTcpForwarding yes",
                    "X11Forwarding no",
                    "PrintMotd no",
                    "UseDNS no",
                    "MaxStartups 100:30:200",
                    "LogLevel INFO",
                    "Subsystem sftp internal-sftp",
                    "",
                ]
            )
        )
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sshd, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            if _wait_for_ssh_banner(port, proc, _START_TIMEOUT):
                yield SshdServer(
                    port=port,
                    client_key=client_key,
                    host_key=host_key,
                    log_path=log_path,
                    user=user,
                )
                return
        finally:
            _stop_process(proc)
        last_log = log_path.read_text(errors="replace")
        # Most likely the port was taken between free_port() and sshd's bind: retry.
    raise BackendUnavailable(f"sshd did not start after {attempts} attempts; log:\n{last_log}")
