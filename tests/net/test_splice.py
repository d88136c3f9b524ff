"""The data path through real tunnels: real clients, a real relay, real local servers.

Mirrors ``src/burrow/pump.py`` and ``src/burrow/stream.py``: every byte here
crosses a visitor's TLS (or raw TCP) connection, the relay's splice, a TLS
data connection and the agent's splice to the local server, and back.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from backends import (
    big_sha256,
    h2c_server,
    http_server,
    sshd_server,
    tcp_echo_server,
    websocket_echo_server,
)
from harness import RelayHarness, wait_until

import burrow
from burrow.net.stream import TLS_READ_SIZE, WRITE_HIGH_WATER, Stream
from burrow.relay.session import RelayTunnel
from burrow.wire import names

MIB = 1024 * 1024

# Every external client is bounded by this, so a stuck data path fails the
# test instead of hanging it.
CLIENT_TIMEOUT = 60


@pytest.fixture(params=["tls-link", "plain-link"])
def relay(request: pytest.FixtureRequest, relay: RelayHarness) -> RelayHarness:
    """Every data-path test runs over TLS data connections and over plaintext ones
    (where raw TCP bytes are moved by splice(2) in the kernel)."""
    if request.param == "plain-link":
        harness: RelayHarness = request.getfixturevalue("plain_relay")
        return harness
    return relay


def curl(
    relay: RelayHarness, *args: str, timeout: float = CLIENT_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--cacert", str(relay.ca), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def relay_tunnel(relay: RelayHarness, tunnel: burrow.Tunnel) -> RelayTunnel:
    label = tunnel.host.split(".", 1)[0]
    return relay.relay.routes[label]


def visitor_context(relay: RelayHarness, alpn: list[str] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(relay.ca))
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


@contextmanager
def tls_visitor(
    relay: RelayHarness, tunnel: burrow.Tunnel, alpn: list[str] | None = None
) -> Iterator[ssl.SSLSocket]:
    """A raw TLS connection to the tunnel, as a browser would open it."""
    host, port = tunnel.tls_socket
    raw = socket.create_connection((names.resolve_host(host), port), timeout=CLIENT_TIMEOUT)
    with visitor_context(relay, alpn).wrap_socket(raw, server_hostname=host) as sock:
        yield sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    parts: list[bytes] = []
    while n:
        data = sock.recv(min(n, MIB))
        if not data:
            raise EOFError(f"EOF with {n} bytes still expected")
        parts.append(data)
        n -= len(data)
    return b"".join(parts)


def read_to_eof(sock: socket.socket) -> bytes:
    parts: list[bytes] = []
    while data := sock.recv(MIB):
        parts.append(data)
    return b"".join(parts)


def read_http_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """(head, the body bytes that came with it) of an HTTP/1.1 response."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        if not data:
            raise EOFError(f"EOF inside the response head: {buffer!r}")
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return head, rest


# -- HTTPS with curl ----------------------------------------------------------


def test_curl_fetches_a_page(relay: RelayHarness) -> None:
    files = {"hello.txt": b"hello through burrow\n"}
    with http_server(files) as server, burrow.forward(server.port, client=relay.client()) as tunnel:
        page = curl(relay, "--fail", tunnel.url + "/")
        assert page.returncode == 0, page.stderr
        assert server.marker in page.stdout
        file = curl(relay, "--fail", tunnel.url + "/hello.txt")
        assert file.returncode == 0, file.stderr
        assert file.stdout == "hello through burrow\n"


def _streams_alive() -> int:
    return sum(1 for obj in gc.get_objects() if isinstance(obj, Stream))


def test_finished_streams_are_freed_without_the_collector(relay: RelayHarness) -> None:
    """A finished visitor's streams, at the relay and at the agent, go as soon as their
    connections close: a reference cycle (stream and splice, stream and its handshake
    timer) kept each one, with its OpenSSL state, until the collector's next full pass,
    and relay RSS grew from 43 to 323 MiB over ten bursts of 1,000 visitors."""
    visits = 20
    with (
        http_server() as server,
        burrow.forward(server.port, unencrypted=True, client=relay.client()) as tunnel,
    ):
        assert curl(relay, "--fail", tunnel.url + "/").returncode == 0  # the pool is warm
        gc.collect()
        gc.disable()
        try:
            before = _streams_alive()
            for _ in range(visits):
                page = curl(relay, "--fail", tunnel.url + "/")
                assert page.returncode == 0, page.stderr
                address = ("127.0.0.1", tunnel.tcp_socket[1])
                with socket.create_connection(address, timeout=CLIENT_TIMEOUT) as sock:
                    sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    assert server.marker.encode() in read_to_eof(sock)
            # Each visit made 2 streams at the relay and 2 at the agent; the pool is
            # refilled to its size, so what is left is a few more at most.
            wait_until(
                lambda: _streams_alive() - before < visits // 2,
                f"the streams of {visits * 2} finished visits to be freed "
                f"({_streams_alive() - before} more than before)",
                seconds=15,
            )
        finally:
            gc.enable()


def test_curl_100_concurrent_requests(relay: RelayHarness, tmp_path: Path) -> None:
    count = 100
    files = {f"f{i}": f"body {i} ".encode() * (i + 1) for i in range(count)}
    with http_server(files) as server, burrow.forward(server.port, client=relay.client()) as tunnel:
        args: list[str] = []
        for i in range(count):
            args += [f"{tunnel.url}/f{i}", "-o", str(tmp_path / f"out{i}")]
        result = curl(
            relay,
            "--fail",
            "--parallel",
            "--parallel-immediate",
            "--parallel-max",
            str(count),
            "-w",
            "%{http_code}\n",
            *args,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["200"] * count
        for i in range(count):
            assert (tmp_path / f"out{i}").read_bytes() == files[f"f{i}"], i
        # Each transfer had its own connection, hence its own visitor.
        assert server.requests_served >= count


def stream_sha256(argv: list[str], timeout: float) -> tuple[str, int, int, str]:
    """Run ``argv`` and hash its stdout as it comes: (hex digest, size, returncode, stderr)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    digest = hashlib.sha256()
    size = 0
    try:
        assert proc.stdout is not None and proc.stderr is not None
        while data := proc.stdout.read(MIB):
            digest.update(data)
            size += len(data)
        stderr = proc.stderr.read().decode(errors="replace")
        proc.wait(timeout=10)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return digest.hexdigest(), size, proc.returncode, stderr


def test_curl_256_mib_download(relay: RelayHarness) -> None:
    size = 256 * MIB
    with http_server() as server, burrow.forward(server.port, client=relay.client()) as tunnel:
        digest, got, code, stderr = stream_sha256(
            ["curl", "-sS", "--fail", "--cacert", str(relay.ca), f"{tunnel.url}/big?size={size}"],
            timeout=CLIENT_TIMEOUT,
        )
    assert code == 0, stderr
    assert got == size
    assert digest == big_sha256(size)


# -- ALPN and HTTP/2 ------------------------------------------------------------


def test_http2_through_an_h2_tunnel(relay: RelayHarness) -> None:
    with (
        h2c_server() as server,
        burrow.forward(server.port, h2_enabled=True, client=relay.client()) as tunnel,
    ):
        result = curl(relay, "-v", "--fail", "--http2", tunnel.url + "/")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "http_version=2"
    assert "ALPN: server accepted h2" in result.stderr


def test_no_h2_unless_the_tunnel_asks(relay: RelayHarness) -> None:
    with h2c_server() as server, burrow.forward(server.port, client=relay.client()) as tunnel:
        result = curl(relay, "-v", "--fail", "--http2", "-w", "\n%{http_version}", tunnel.url + "/")
        assert result.returncode == 0, result.stderr
        assert result.stdout == "http_version=1.1\n1.1"
        assert "ALPN: server accepted http/1.1" in result.stderr
        assert "accepted h2" not in result.stderr

        # A client that offers nothing but h2 still never gets it.
        with tls_visitor(relay, tunnel, alpn=["h2"]) as sock:
            assert sock.selected_alpn_protocol() != "h2"
            sock.sendall(
                f"GET / HTTP/1.1\r\nHost: {tunnel.host}\r\nConnection: close\r\n\r\n".encode()
            )
            head, body = read_http_head(sock)
            assert head.startswith(b"HTTP/1.1 200")
            assert body + read_to_eof(sock) == b"http_version=1.1"


# -- WebSocket --------------------------------------------------------------------


async def test_websocket_echo(relay: RelayHarness) -> None:
    from websockets.asyncio.client import connect

    with websocket_echo_server() as server:
        async with burrow.forward(server.port, client=relay.client()) as tunnel:
            host, port = tunnel.tls_socket
            async with connect(
                f"wss://{host}:{port}/",
                ssl=visitor_context(relay),
                host=names.resolve_host(host),
                port=port,
                max_size=4 * MIB,
                open_timeout=CLIENT_TIMEOUT,
            ) as ws:
                await ws.send("hello, websocket")
                assert await ws.recv() == "hello, websocket"
                blob = hashlib.shake_256(b"ws").digest(MIB)
                await ws.send(blob)
                assert await ws.recv() == blob


# -- raw TCP with half-close ----------------------------------------------------------


def tcp_echo_half_close(address: tuple[str, int], payload: bytes) -> bytes:
    """Send ``payload``, shut down our write side, then read every reply byte until EOF."""
    host, port = address
    with socket.create_connection((names.resolve_host(host), port), timeout=CLIENT_TIMEOUT) as sock:
        received = bytearray()

        def reader() -> None:
            while data := sock.recv(MIB):
                received.extend(data)

        # Read while writing: the echo comes back as we send, and a few MB would
        # otherwise fill every buffer on the way and stall both ends.
        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        thread.join(CLIENT_TIMEOUT)
        assert not thread.is_alive(), f"no EOF after {len(received)} of {len(payload)} bytes"
        return bytes(received)


def tls_echo_half_close(
    relay: RelayHarness, tunnel: burrow.Tunnel, payload: bytes, *, close_notify: bool = True
) -> bytes:
    """:func:`tcp_echo_half_close` through the HTTPS address: our EOF is a TLS close_notify.

    Python's ``SSLSocket`` cannot send close_notify and keep reading, so this
    visitor runs TLS over memory BIOs, as burrow itself does. With
    ``close_notify=False`` our EOF is a bare TCP FIN, as some clients send it.
    """
    host, port = tunnel.tls_socket
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = visitor_context(relay).wrap_bio(incoming, outgoing, server_hostname=host)
    with socket.create_connection((names.resolve_host(host), port), timeout=CLIENT_TIMEOUT) as sock:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                data = sock.recv(65536)
                if not data:
                    raise EOFError("EOF in the TLS handshake") from None
                incoming.write(data)
        sock.sendall(outgoing.read())

        lock = threading.Lock()  # the SSLObject is shared by the reader and the writer
        received = bytearray()
        peer_close_notify = threading.Event()

        def reader() -> None:
            while True:
                data = sock.recv(MIB)
                with lock:
                    if not data:
                        return  # TCP EOF without close_notify
                    incoming.write(data)
                    while True:
                        try:
                            chunk = tls.read(MIB)
                        except ssl.SSLWantReadError:
                            break
                        except ssl.SSLZeroReturnError:
                            chunk = b""
                        if not chunk:  # the peer's close_notify
                            peer_close_notify.set()
                            return
                        received.extend(chunk)

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        for start in range(0, len(payload), 256 * 1024):
            with lock:
                tls.write(payload[start : start + 256 * 1024])
                records = outgoing.read()
            sock.sendall(records)  # outside the lock: the reader must keep reading meanwhile
        if close_notify:
            with lock:
                with suppress(ssl.SSLWantReadError):
                    tls.unwrap()  # sends close_notify; the peer's comes later
                records = outgoing.read()
            sock.sendall(records)
        else:
            sock.shutdown(socket.SHUT_WR)
        thread.join(CLIENT_TIMEOUT)
        assert not thread.is_alive(), f"no EOF after {len(received)} of {len(payload)} bytes"
        assert peer_close_notify.is_set(), "the relay ended TLS without close_notify"
        return bytes(received)


@pytest.mark.parametrize("size", [1, 10_000, 5 * MIB])
def test_tcp_echo_with_half_close(relay: RelayHarness, size: int) -> None:
    payload = hashlib.shake_256(b"tcp").digest(size)
    with (
        tcp_echo_server() as server,
        burrow.forward(server.port, unencrypted=True, client=relay.client()) as tunnel,
    ):
        assert tcp_echo_half_close(tunnel.tcp_socket, payload) == payload


@pytest.mark.parametrize("size", [0, 10_000, 5 * MIB])
def test_tls_echo_with_half_close(relay: RelayHarness, size: int) -> None:
    payload = hashlib.shake_256(b"tls").digest(size)
    with tcp_echo_server() as server, burrow.forward(server.port, client=relay.client()) as tunnel:
        assert tls_echo_half_close(relay, tunnel, payload) == payload


@pytest.mark.parametrize("size", [0, 10_000, 5 * MIB])
def test_tls_visitor_half_closes_with_a_bare_fin(relay: RelayHarness, size: int) -> None:
    """A TCP FIN without close_notify ends the visitor's direction only."""
    payload = hashlib.shake_256(b"fin").digest(size)
    with tcp_echo_server() as server, burrow.forward(server.port, client=relay.client()) as tunnel:
        assert tls_echo_half_close(relay, tunnel, payload, close_notify=False) == payload


def test_tcp_half_close_with_nothing_sent(relay: RelayHarness) -> None:
    with (
        tcp_echo_server() as server,
        burrow.forward(server.port, unencrypted=True, client=relay.client()) as tunnel,
    ):
        assert tcp_echo_half_close(tunnel.tcp_socket, b"") == b""


@contextmanager
def speak_first_server(banner: bytes) -> Iterator[tuple[int, list[bytes]]]:
    """A server that sends ``banner``, half-closes, then reads until the visitor's EOF.

    Yields its port and a list that gets what the visitor sent, once it is whole.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    heard: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(CLIENT_TIMEOUT)
            conn.sendall(banner)
            conn.shutdown(socket.SHUT_WR)
            parts = []
            while data := conn.recv(MIB):
                parts.append(data)
            heard.append(b"".join(parts))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], heard
    finally:
        listener.close()
        thread.join(CLIENT_TIMEOUT)


def wait_for(predicate: object, what: str, timeout: float = 10.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_tcp_local_server_half_closes_first(relay: RelayHarness) -> None:
    banner = hashlib.shake_256(b"banner").digest(3 * MIB)
    question = hashlib.shake_256(b"question").digest(2 * MIB)
    with (
        speak_first_server(banner) as (port, heard),
        burrow.forward(port, unencrypted=True, client=relay.client()) as tunnel,
    ):
        host, tcp_port = tunnel.tcp_socket
        with socket.create_connection((names.resolve_host(host), tcp_port), timeout=30) as sock:
            assert read_to_eof(sock) == banner
            # Our direction is still open: the server hears all of it.
            sock.sendall(question)
            sock.shutdown(socket.SHUT_WR)
            wait_for(lambda: heard, "the server to read the visitor's EOF")
            assert heard == [question]
            assert sock.recv(1) == b""


def test_tls_local_server_half_closes_first(relay: RelayHarness) -> None:
    banner = hashlib.shake_256(b"banner").digest(3 * MIB)
    question = hashlib.shake_256(b"question").digest(2 * MIB)
    with (
        speak_first_server(banner) as (port, heard),
        burrow.forward(port, client=relay.client()) as tunnel,
    ):
        host, tls_port = tunnel.tls_socket
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = visitor_context(relay).wrap_bio(incoming, outgoing, server_hostname=host)
        received = bytearray()
        with socket.create_connection((names.resolve_host(host), tls_port), timeout=30) as sock:
            while True:  # handshake, then read until the relay's close_notify
                try:
                    if tls.version() is None:
                        tls.do_handshake()
                    chunk = tls.read(MIB)
                    if not chunk:  # the relay's close_notify
                        break
                    received += chunk
                    continue
                except ssl.SSLWantReadError:
                    pass
                sock.sendall(outgoing.read())
                data = sock.recv(MIB)
                assert data, "TCP EOF without close_notify"
                incoming.write(data)
            assert bytes(received) == banner
            # We may still write after the relay's close_notify (TLS 1.3 half-close).
            tls.write(question)
            with suppress(ssl.SSLWantReadError):
                tls.unwrap()
            sock.sendall(outgoing.read())
            wait_for(lambda: heard, "the server to read the visitor's EOF")
            assert heard == [question]
            assert sock.recv(1) == b""


def test_ssh_through_a_raw_tcp_tunnel(relay: RelayHarness, tmp_path: Path) -> None:
    with (
        sshd_server(tmp_path) as srv,
        burrow.forward(srv.port, unencrypted=True, client=relay.client()) as tunnel,
    ):
        _, tcp_port = tunnel.tcp_socket
        result = subprocess.run(
            srv.ssh_command("127.0.0.1", tcp_port, "echo hello-from-ssh"),
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    assert result.returncode == 0, result.stderr + srv.log_path.read_text(errors="replace")
    assert result.stdout == "hello-from-ssh\n"


# -- back-pressure ----------------------------------------------------------------------


def test_slow_visitor_gets_every_byte(relay: RelayHarness) -> None:
    """A visitor reading at a fraction of the backend's speed still gets the whole stream."""
    size = 24 * MIB
    with http_server() as server, burrow.forward(server.port, client=relay.client()) as tunnel:
        digest, got, code, stderr = stream_sha256(
            [
                "curl",
                "-sS",
                "--fail",
                "--limit-rate",
                "24M",
                "--cacert",
                str(relay.ca),
                f"{tunnel.url}/big?size={size}",
            ],
            timeout=CLIENT_TIMEOUT,
        )
    assert code == 0, stderr
    assert got == size
    assert digest == big_sha256(size)



def kernel_buffer_bound(hops: int) -> int:
    """Most bytes the kernel may hold on ``hops`` loopback TCP connections.

    Receive buffers autotune up to tcp_rmem's maximum (32 MiB on many
    machines) and send buffers up to tcp_wmem's; a stalled reader can leave
    that much in flight without anyone in burrow buffering it.
    """
    rmem = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
    wmem = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    return hops * (rmem + wmem)

def test_stalled_visitor_holds_the_stream_back(relay: RelayHarness) -> None:
    """While a visitor reads nothing, the relay stops pulling the download, not buffering it."""
    size = 64 * MIB
    with (
        http_server() as server,
        burrow.forward(server.port, client=relay.client()) as tunnel,
        tls_visitor(relay, tunnel) as sock,
    ):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(f"GET /big?size={size} HTTP/1.1\r\nHost: {tunnel.host}\r\n\r\n".encode())
        head, body = read_http_head(sock)
        assert head.startswith(b"HTTP/1.1 200")

        route = relay_tunnel(relay, tunnel)
        (splice,) = route.splices

        # Wait until the relay stops forwarding, then see what it holds.
        last, stable_since = -1, time.monotonic()
        deadline = time.monotonic() + 20
        while time.monotonic() - stable_since < 0.5:
            assert time.monotonic() < deadline, "the relay never stopped forwarding"
            now = splice.bytes_b_to_a
            if now != last:
                last, stable_since = now, time.monotonic()
            time.sleep(0.02)

        async def buffered() -> int:
            assert splice.a.transport is not None
            return splice.a.transport.get_write_buffer_size()

        held = relay.call(buffered())
        # Between the relay and the visitor: one connection's kernel buffers and ours.
        bound = kernel_buffer_bound(1) + WRITE_HIGH_WATER + 2 * TLS_READ_SIZE
        assert bound < size
        assert last < bound, f"the relay pulled {last} bytes for a stalled visitor"
        # One TLS read past the high-water mark, at most, plus TLS framing.
        assert held <= WRITE_HIGH_WATER + 2 * TLS_READ_SIZE, held

        digest = hashlib.sha256(body)
        remaining = size - len(body)
        while remaining:
            data = sock.recv(min(remaining, MIB))
            assert data, f"EOF with {remaining} bytes missing"
            digest.update(data)
            remaining -= len(data)
    assert digest.hexdigest() == big_sha256(size)


# -- nothing left behind ------------------------------------------------------------------


def splice_counts(
    relay: RelayHarness, fwd: burrow.forward, tunnel: burrow.Tunnel
) -> tuple[int, int]:
    """Live splices of this tunnel at the relay and at the agent."""
    assert fwd._session is not None
    (agent_tunnel,) = [t for t in fwd._session.tunnels.values() if t.tunnel is tunnel]
    return len(relay_tunnel(relay, tunnel).splices), len(agent_tunnel.splices)


def test_finished_visitors_leave_no_splices(relay: RelayHarness, tmp_path: Path) -> None:
    with (
        http_server() as server,
        (fwd := burrow.forward(server.port, client=relay.client())) as tunnel,
    ):
        args: list[str] = []
        for i in range(30):
            args += [f"{tunnel.url}/", "-o", str(tmp_path / f"out{i}")]
        result = curl(relay, "--fail", "--parallel", *args)
        assert result.returncode == 0, result.stderr
        wait_for(lambda: splice_counts(relay, fwd, tunnel) == (0, 0), "splices to end")


def test_visitor_reset_ends_both_sides(relay: RelayHarness) -> None:
    size = 256 * MIB
    with (
        http_server() as server,
        (fwd := burrow.forward(server.port, client=relay.client())) as tunnel,
    ):
        with tls_visitor(relay, tunnel) as sock:
            sock.sendall(f"GET /big?size={size} HTTP/1.1\r\nHost: {tunnel.host}\r\n\r\n".encode())
            read_http_head(sock)
            assert splice_counts(relay, fwd, tunnel) == (1, 1)
            # Close with a reset (linger 0) in the middle of the download.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        wait_for(lambda: splice_counts(relay, fwd, tunnel) == (0, 0), "splices to end")
        # The tunnel still serves.
        page = curl(relay, "--fail", tunnel.url + "/")
        assert page.returncode == 0, page.stderr
        assert server.marker in page.stdout


def test_local_server_reset_reaches_the_visitor(relay: RelayHarness) -> None:
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        conn.recv(100)
        conn.sendall(b"partial answer")
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with (
        listener,
        (
            fwd := burrow.forward(
                listener.getsockname()[1], unencrypted=True, client=relay.client()
            )
        ) as tunnel,
    ):
        host, port = tunnel.tcp_socket
        with socket.create_connection(
            (names.resolve_host(host), port), timeout=CLIENT_TIMEOUT
        ) as sock:
            sock.sendall(b"question")
            got = b""
            with suppress(ConnectionResetError):
                while data := sock.recv(100):
                    got += data
            assert b"partial answer".startswith(got)
        wait_for(lambda: splice_counts(relay, fwd, tunnel) == (0, 0), "splices to end")
    thread.join(CLIENT_TIMEOUT)


# -- more traffic shapes --------------------------------------------------------------------


def test_curl_64_mib_upload(relay: RelayHarness, tmp_path: Path) -> None:
    size = 64 * MIB
    upload = tmp_path / "upload.bin"
    with upload.open("wb") as f:
        for i in range(size // MIB):
            f.write(hashlib.shake_256(b"up%d" % i).digest(MIB))
    expected = hashlib.sha256(upload.read_bytes()).hexdigest()
    with http_server() as server, burrow.forward(server.port, client=relay.client()) as tunnel:
        digest, got, code, stderr = stream_sha256(
            [
                "curl",
                "-sS",
                "--fail",
                "--cacert",
                str(relay.ca),
                "--data-binary",
                f"@{upload}",
                f"{tunnel.url}/echo",
            ],
            timeout=CLIENT_TIMEOUT,
        )
    assert code == 0, stderr
    assert got == size
    assert digest == expected


def test_http2_many_streams_on_one_connection(relay: RelayHarness, tmp_path: Path) -> None:
    count = 50
    with (
        h2c_server() as server,
        burrow.forward(server.port, h2_enabled=True, client=relay.client()) as tunnel,
    ):
        args: list[str] = []
        for i in range(count):
            args += [f"{tunnel.url}/{i}", "-o", str(tmp_path / f"out{i}")]
        result = curl(
            relay,
            "--fail",
            "--http2",
            "--parallel",
            "-w",
            "%{http_version} %{num_connects}\n",
            *args,
        )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")[:-1]
    assert len(lines) == count
    assert all(line.startswith("2 ") for line in lines), lines
    # curl multiplexed the streams over one (or very few) connection(s).
    assert sum(int(line.split()[1]) for line in lines) <= 2
    for i in range(count):
        assert (tmp_path / f"out{i}").read_bytes() == b"http_version=2"


def test_parallel_downloads_all_arrive_whole(relay: RelayHarness, tmp_path: Path) -> None:
    count, size = 8, 8 * MIB
    with http_server() as server, burrow.forward(server.port, client=relay.client()) as tunnel:
        args: list[str] = []
        for i in range(count):
            args += [f"{tunnel.url}/big?size={size}", "-o", str(tmp_path / f"out{i}")]
        result = curl(relay, "--fail", "--parallel", *args)
    assert result.returncode == 0, result.stderr
    expected = big_sha256(size)
    for i in range(count):
        assert hashlib.sha256((tmp_path / f"out{i}").read_bytes()).hexdigest() == expected, i


def test_stalled_local_server_holds_the_visitor_back(relay: RelayHarness) -> None:
    """While the local server reads nothing, neither the relay nor the agent buffers the upload."""
    from burrow.agent.client import runtime

    size = 160 * MIB
    payload = hashlib.shake_256(b"upload").digest(size)
    listener = socket.create_server(("127.0.0.1", 0))
    with (
        listener,
        (
            fwd := burrow.forward(
                listener.getsockname()[1], unencrypted=True, client=relay.client()
            )
        ) as tunnel,
    ):
        host, port = tunnel.tcp_socket
        with socket.create_connection(
            (names.resolve_host(host), port), timeout=CLIENT_TIMEOUT
        ) as sock:
            sent = 0

            def send_all() -> None:
                nonlocal sent
                view = memoryview(payload)
                while sent < size:
                    sent += sock.send(view[sent : sent + MIB])

            sender = threading.Thread(target=send_all, daemon=True)
            sender.start()
            listener.settimeout(CLIENT_TIMEOUT)
            conn, _ = listener.accept()  # accepted, but not read from yet
            with conn:
                route = relay_tunnel(relay, tunnel)
                wait_for(lambda: len(route.splices) == 1, "the relay's splice")
                (splice,) = route.splices
                last, stable_since = -1, time.monotonic()
                deadline = time.monotonic() + 20
                while time.monotonic() - stable_since < 0.5:
                    assert time.monotonic() < deadline, "the relay never stopped forwarding"
                    if splice.bytes_a_to_b != last:
                        last, stable_since = splice.bytes_a_to_b, time.monotonic()
                    time.sleep(0.02)
                # Relay -> agent -> server: two connections' kernel buffers, and ours.
                bound = kernel_buffer_bound(2) + 2 * (WRITE_HIGH_WATER + 2 * TLS_READ_SIZE)
                assert bound < size
                assert last < bound, f"the relay pulled {last} bytes for a stalled server"

                async def buffered(stream: Stream) -> int:
                    assert stream.transport is not None
                    return stream.transport.get_write_buffer_size()

                assert fwd._session is not None
                (agent_tunnel,) = fwd._session.tunnels.values()
                (agent_splice,) = agent_tunnel.splices
                at_relay = relay.call(buffered(splice.b))
                at_agent = asyncio.run_coroutine_threadsafe(
                    buffered(agent_splice.b), runtime.loop()
                ).result(10)
                bound = WRITE_HIGH_WATER + 2 * TLS_READ_SIZE
                assert at_relay <= bound, at_relay
                assert at_agent <= bound, at_agent

                digest = hashlib.sha256()
                remaining = size
                conn.settimeout(CLIENT_TIMEOUT)
                while remaining:
                    data = conn.recv(min(remaining, MIB))
                    assert data, f"EOF with {remaining} bytes missing"
                    digest.update(data)
                    remaining -= len(data)
                assert digest.digest() == hashlib.sha256(payload).digest()
            sender.join(CLIENT_TIMEOUT)
