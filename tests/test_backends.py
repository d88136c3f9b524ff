"""The test backends work on their own, with real clients, before burrow sits in front."""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from backends import (
    big_chunks,
    big_sha256,
    free_port,
    h2c_server,
    http_server,
    sshd_server,
    tcp_echo_server,
    websocket_echo_server,
)


def curl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    exe = shutil.which("curl")
    assert exe, "curl is required (scripts/test installs it)"
    return subprocess.run(
        [exe, "-sS", "--fail", "--max-time", str(timeout), *args],
        capture_output=True,
        timeout=timeout + 10,
        check=True,
    )


# --------------------------------------------------------------------------- helpers


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_big_content_is_deterministic_and_independent_of_chunking() -> None:
    size = 3 * 65536 + 12345
    whole = b"".join(big_chunks(size))
    assert len(whole) == size
    assert b"".join(big_chunks(size, chunk=1000)) == whole
    assert hashlib.sha256(whole).hexdigest() == big_sha256(size)
    assert big_sha256(0) == hashlib.sha256(b"").hexdigest()
    assert whole[:65536] != whole[65536 : 2 * 65536]


# --------------------------------------------------------------------------- HTTP


def test_http_index_and_files() -> None:
    files = {"hello.txt": b"hello, burrow\n", "bin": bytes(range(256)) * 4}
    with http_server(files, marker="unique-marker-123") as srv:
        index = curl(f"http://127.0.0.1:{srv.port}/").stdout
        assert b"unique-marker-123" in index
        assert curl(f"{srv.url}/hello.txt").stdout == files["hello.txt"]
        assert curl(f"{srv.url}/bin").stdout == files["bin"]
        missing = subprocess.run(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{srv.url}/nope"],
            capture_output=True,
            check=True,
        )
        assert missing.stdout == b"404"


def test_http_keep_alive_and_echo() -> None:
    with http_server({"a": b"A" * 1000}) as srv:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        try:
            for _ in range(3):
                conn.request("GET", "/a")
                resp = conn.getresponse()
                assert resp.status == 200
                assert resp.getheader("Content-Length") == "1000"
                assert resp.read() == b"A" * 1000
                assert not resp.will_close
            first_sock = conn.sock
            conn.request("POST", "/echo", body=b"ping" * 100, headers={"Content-Type": "x/y"})
            resp = conn.getresponse()
            assert resp.read() == b"ping" * 100
            assert resp.getheader("Content-Type") == "x/y"
            assert conn.sock is first_sock  # the same connection served every request
            conn.request("HEAD", "/big?size=1000")
            resp = conn.getresponse()
            assert resp.getheader("Content-Length") == "1000"
            assert resp.read() == b""
        finally:
            conn.close()
        assert srv.requests_served == 5
        chunked = curl(
            "-H", "Transfer-Encoding: chunked", "--data-binary", "xyz", f"{srv.url}/echo"
        )
        assert chunked.stdout == b"xyz"


def test_http_100_concurrent_clients() -> None:
    files = {f"f{i}": f"file number {i}\n".encode() * (i + 1) for i in range(100)}
    with http_server(files) as srv:
        barrier = threading.Barrier(100, timeout=30)

        def fetch_held_open(i: int) -> bytes:
            # Open the connection, wait until all 100 are connected, then request.
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
            try:
                conn.connect()
                barrier.wait()
                conn.request("GET", f"/f{i}")
                return conn.getresponse().read()
            finally:
                conn.close()

        with ThreadPoolExecutor(max_workers=100) as pool:
            held = list(pool.map(fetch_held_open, range(100)))
            assert held == [files[f"f{i}"] for i in range(100)]
            by_curl = list(pool.map(lambda i: curl(f"{srv.url}/f{i}").stdout, range(100)))
            assert by_curl == [files[f"f{i}"] for i in range(100)]


def test_http_big_streams_32mib() -> None:
    size = 32 * 1024 * 1024
    with (
        http_server() as srv,
        subprocess.Popen(
            ["curl", "-sS", "--fail", "--max-time", "60", f"{srv.url}/big?size={size}"],
            stdout=subprocess.PIPE,
        ) as proc,
    ):
        assert proc.stdout is not None
        digest = hashlib.sha256()
        total = 0
        while chunk := proc.stdout.read(1 << 20):
            digest.update(chunk)
            total += len(chunk)
        assert proc.wait(timeout=60) == 0
    assert total == size
    assert digest.hexdigest() == big_sha256(size)


# --------------------------------------------------------------------------- TCP echo


def _recv_all(sock: socket.socket) -> bytes:
    parts = []
    while data := sock.recv(1 << 16):
        parts.append(data)
    return b"".join(parts)


def test_tcp_echo_round_trips_and_half_close() -> None:
    with tcp_echo_server() as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            for msg in (b"hello\n", b"x", b"\x00\xff" * 1000):
                s.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    got += s.recv(65536)
                assert got == msg
            s.sendall(b"last words")
            s.shutdown(socket.SHUT_WR)
            assert _recv_all(s) == b"last words"  # ...and then EOF
        assert srv.connections == 1


def test_tcp_echo_large_payload_then_half_close() -> None:
    payload = os.urandom(8 * 1024 * 1024)
    with tcp_echo_server() as srv, socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.settimeout(30)

        def send() -> None:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        received = _recv_all(s)
        sender.join()
    assert received == payload


def test_tcp_echo_many_connections() -> None:
    with tcp_echo_server() as srv:

        def one(i: int) -> bytes:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
                s.sendall(f"conn {i}".encode())
                s.shutdown(socket.SHUT_WR)
                return _recv_all(s)

        with ThreadPoolExecutor(max_workers=100) as pool:
            assert list(pool.map(one, range(100))) == [f"conn {i}".encode() for i in range(100)]


# --------------------------------------------------------------------------- WebSocket


async def test_websocket_echo() -> None:
    from websockets.asyncio.client import connect

    with websocket_echo_server() as srv:
        async with connect(f"ws://127.0.0.1:{srv.port}/", max_size=None) as ws:
            await ws.send("hello text")
            assert await ws.recv() == "hello text"
            blob = os.urandom(2 * 1024 * 1024)
            await ws.send(blob)
            assert await ws.recv() == blob
            for i in range(50):
                await ws.send(f"m{i}")
            assert [await ws.recv() for _ in range(50)] == [f"m{i}" for i in range(50)]


# --------------------------------------------------------------------------- h2c


def test_h2c_prior_knowledge_and_http11() -> None:
    with h2c_server() as srv:
        url = f"http://127.0.0.1:{srv.port}/"
        h2 = curl("--http2-prior-knowledge", "-w", "\n%{http_version}", url)
        assert h2.stdout == b"http_version=2\n2"
        h1 = curl("--http1.1", url)
        assert h1.stdout == b"http_version=1.1"


# --------------------------------------------------------------------------- sshd


def test_sshd_runs_a_command(tmp_path: Path) -> None:
    with sshd_server(tmp_path) as srv:
        assert srv.client_key.is_file()
        cmd = srv.ssh_command("127.0.0.1", srv.port, "echo hello")
        result = subprocess.run(cmd, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        assert result.stdout == b"hello\n"
