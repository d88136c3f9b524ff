"""The tests' network with distances keeps its promises (tests/netns.py, tests/netpath.py).

These measure the delay a path adds because adding it is the helper's job:
each figure is compared with what the path was asked for, with generous
bounds, and says nothing of burrow's speed.
"""

from __future__ import annotations

import os
import socket
import statistics
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import netns
import pytest

pytestmark = pytest.mark.skipif(netns.unavailable() is not None, reason=str(netns.unavailable()))

# A path's timers fire within about half a millisecond of their time each way
# (tests/netpath.py); a busy machine adds scheduling delays on top.
TOLERANCE_MS = 2.0
TOLERANCE_SHARE = 0.15


def close_to(measured_ms: float, wanted_ms: float) -> bool:
    return abs(measured_ms - wanted_ms) <= TOLERANCE_MS + TOLERANCE_SHARE * wanted_ms


@contextmanager
def server(net: netns.Network, handle: Callable[[socket.socket], None]) -> Iterator[int]:
    """A TCP server of this process inside ``net``: ``handle`` runs on each connection."""
    listener = net.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)


def echo(conn: socket.socket) -> None:
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def sink(conn: socket.socket) -> None:
    with conn:
        while conn.recv(1 << 20):
            pass


def connect(net: netns.Network, port: int, timeout: float = 10) -> socket.socket:
    sock = net.socket()
    sock.settimeout(timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.connect(("127.0.0.1", port))
    return sock


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(min(1 << 20, size - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.fixture
def net() -> Iterator[netns.Network]:
    with netns.network() as network:
        yield network


@pytest.mark.parametrize("rtt_ms", [5, 20, 50])
def test_a_round_trip_takes_the_paths_rtt(net: netns.Network, rtt_ms: int) -> None:
    firsts, times = [], []
    with server(net, echo) as port:
        path = net.path(0, to=port, rtt_ms=rtt_ms)
        for _ in range(5):
            started = time.perf_counter()
            with connect(net, path.port) as sock:
                sock.sendall(b"x")
                assert sock.recv(1) == b"x"
                # A new connection: the handshake's round trip, then the echo's.
                firsts.append((time.perf_counter() - started) * 1000)
                for _ in range(5):
                    started = time.perf_counter()
                    sock.sendall(b"y")
                    assert sock.recv(1) == b"y"
                    times.append((time.perf_counter() - started) * 1000)
    assert close_to(statistics.median(times), rtt_ms), f"asked {rtt_ms} ms, measured {times}"
    first = statistics.median(firsts)
    assert close_to(first, 2 * rtt_ms), f"asked {rtt_ms} ms, first echoes after {firsts}"


def test_bytes_arrive_in_order_and_eof_crosses_after_them(net: netns.Network) -> None:
    payload = os.urandom(3 << 20)
    with server(net, echo) as port:
        path = net.path(0, to=port, rtt_ms=10)
        with connect(net, path.port) as sock:
            received: list[bytes] = []
            reader = threading.Thread(target=lambda: received.append(recv_exactly(sock, 1 << 30)))
            reader.start()
            # Writes of many sizes, then a half-close: the echo server sees EOF only
            # after the last byte, answers it all, and closes its side in turn.
            offset = 0
            for size in [1, 7, 1000, 65536, 200_000, *([100_003] * 40)]:
                sock.sendall(payload[offset : offset + size])
                offset += size
            sock.sendall(payload[offset:])
            sock.shutdown(socket.SHUT_WR)
            reader.join(30)
    assert received == [payload]


def test_eof_from_the_server_leaves_the_other_direction_open(net: netns.Network) -> None:
    def greet_then_read(conn: socket.socket) -> None:
        with conn:
            conn.sendall(b"hello")
            conn.shutdown(socket.SHUT_WR)
            results.append(recv_exactly(conn, 100))  # up to the client's EOF

    results: list[bytes] = []
    with server(net, greet_then_read) as port:
        path = net.path(0, to=port, rtt_ms=10)
        with connect(net, path.port) as sock:
            assert recv_exactly(sock, 100) == b"hello"  # then EOF
            sock.sendall(b"still")
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(10) == b""
    deadline = time.monotonic() + 5
    while not results and time.monotonic() < deadline:
        time.sleep(0.01)
    assert results == [b"still"]


def test_a_reset_crosses_the_path_both_ways(net: netns.Network) -> None:
    accepted: list[socket.socket] = []
    with server(net, accepted.append) as port:
        path = net.path(0, to=port, rtt_ms=10)
        # The server resets: the client's next read fails with ECONNRESET.
        with connect(net, path.port) as sock:
            sock.sendall(b"x")
            deadline = time.monotonic() + 5
            while not accepted and time.monotonic() < deadline:
                time.sleep(0.01)
            reset(accepted.pop())
            with pytest.raises(ConnectionResetError):
                while sock.recv(10):
                    pass
        # The client resets: the server's read fails the same way.
        sock = connect(net, path.port)
        sock.sendall(b"x")
        deadline = time.monotonic() + 5
        while not accepted and time.monotonic() < deadline:
            time.sleep(0.01)
        conn = accepted.pop()
        conn.settimeout(5)
        assert conn.recv(1) == b"x"
        reset(sock)
        with pytest.raises(ConnectionResetError):
            conn.recv(10)
        conn.close()


def test_a_refused_connect_is_a_reset_one_round_trip_later(net: netns.Network) -> None:
    with net.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    path = net.path(0, to=closed, rtt_ms=40)
    with connect(net, path.port) as sock:
        started = time.perf_counter()
        with pytest.raises(ConnectionResetError):
            sock.recv(10)
        assert close_to((time.perf_counter() - started) * 1000, 40)


def test_a_bulk_transfer_moves_at_the_links_rate(net: netns.Network) -> None:
    size = 4 << 20
    with server(net, sink) as port:
        path = net.path(0, to=port, rtt_ms=20, rate_mbit=16)  # 2 MB/s
        with connect(net, path.port, timeout=30) as sock:
            started = time.perf_counter()
            sock.sendall(os.urandom(size))
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b""  # the sink has read everything and closed
            elapsed = time.perf_counter() - started
    rate_mbit = size * 8 / elapsed / 1e6
    assert 16 * 0.8 <= rate_mbit <= 16 * 1.05, f"{rate_mbit:.1f} Mbit/s on a 16 Mbit/s link"


def test_one_stream_moves_at_most_a_window_per_round_trip(net: netns.Network) -> None:
    window, rtt_ms, size = 256 * 1024, 50, 4 << 20
    with server(net, sink) as port:
        path = net.path(0, to=port, rtt_ms=rtt_ms, window=window)
        with connect(net, path.port, timeout=30) as sock:
            started = time.perf_counter()
            sock.sendall(os.urandom(size))
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(1) == b""
            elapsed = time.perf_counter() - started
    bound = window / (rtt_ms / 1000)  # the bandwidth-delay product: bytes/s
    assert 0.6 * bound <= size / elapsed <= 1.1 * bound, f"{size / elapsed:.0f} B/s, bound {bound}"


def test_a_reader_that_stops_holds_the_writer_back(net: netns.Network) -> None:
    """The path buffers at most its window: past it, the sender's kernel pushes back."""
    window = 1 << 20
    held: list[socket.socket] = []
    with server(net, held.append) as port:  # accepts and never reads
        path = net.path(0, to=port, rtt_ms=5, window=window)
        with connect(net, path.port) as sock:
            sock.setblocking(False)
            sent, chunk = 0, b"z" * 65536
            deadline = time.monotonic() + 3
            stalled_since = time.monotonic()
            while time.monotonic() < deadline and sent < 512 << 20:
                try:
                    sent += sock.send(chunk)
                    stalled_since = time.monotonic()
                except BlockingIOError:
                    if time.monotonic() - stalled_since > 0.5:
                        break
                    time.sleep(0.01)
    # The window plus the kernel's socket buffers on either side of the path.
    assert sent < window + (64 << 20), f"{sent} bytes accepted with nobody reading"


def test_a_silent_path_holds_bytes_without_closing_then_flows_again(net: netns.Network) -> None:
    with server(net, echo) as port:
        path = net.path(0, to=port, rtt_ms=10)
        with connect(net, path.port, timeout=1) as sock:
            sock.sendall(b"a")
            assert sock.recv(1) == b"a"
            path.silent()
            sock.sendall(b"b")
            with pytest.raises(TimeoutError):
                sock.recv(1)  # neither an answer, nor EOF, nor a reset
            path.flow()
            assert sock.recv(1) == b"b"
            path.reset()
            with pytest.raises(ConnectionResetError):
                sock.recv(1)


def test_the_namespace_and_everything_in_it_are_gone_after_an_error() -> None:
    with pytest.raises(RuntimeError, match="boom"), netns.network() as net:
        name = net.name
        sleeper = net.popen(["sleep", "600"])
        path = net.path(0, to=1, rtt_ms=1)
        assert (
            name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        )
        raise RuntimeError("boom")
    assert sleeper.poll() is not None
    assert path.proc.poll() is not None
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert name not in listed


def test_nothing_leaves_the_namespace(net: netns.Network) -> None:
    # Loopback is the only interface, and no route leads anywhere else.
    links = net.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.splitlines()
    assert [line.split(":")[1].strip() for line in links] == ["lo"]
    assert net.run(["ip", "route"], capture_output=True, text=True).stdout.strip() == ""
    assert net.run(["ip", "-6", "route"], capture_output=True, text=True).stdout.strip() in (
        "",
        "::1 dev lo proto kernel metric 256 pref medium",
    )
    # Its processes live inside; its listeners are not seen from the host, and the
    # host's loopback is not reachable from inside.
    with server(net, echo) as port:
        path = net.path(0, to=port, rtt_ms=1)
        assert os.stat(f"/proc/{path.proc.pid}/ns/net").st_ino == net.inode()
        assert net.inode() != os.stat("/proc/self/ns/net").st_ino
        assert ("127.0.0.1", path.port) in net.listening()
        host = socket.socket()
        host.bind(("127.0.0.1", 0))
        host.listen()
        with host, net.socket() as inside, pytest.raises(ConnectionRefusedError):
            inside.connect(host.getsockname())
        with socket.socket() as outside:
            assert outside.connect_ex(("127.0.0.1", path.port)) != 0 or path.port in _host_ports()
        for pid in net.pids():
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == net.inode()


def _host_ports() -> set[int]:
    """Ports something listens on in the host's namespace (another program's, by chance)."""
    out = subprocess.run(["ss", "-Htln"], capture_output=True, text=True).stdout
    return {int(line.split()[3].rpartition(":")[2]) for line in out.splitlines()}
