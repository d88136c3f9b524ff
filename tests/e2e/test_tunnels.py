"""Tunnel lifecycle as ``burrow.forward()`` users see it, through real clients.

Publishing, isolation between tunnels and between processes, a local server
that is not up yet, and what leaving the ``with`` block does to new and
in-flight visitors.
"""

from __future__ import annotations

import asyncio
import http.server
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from backends import http_server, tcp_echo_server, websocket_echo_server
from harness import RelayHarness

import burrow
from burrow.wire import names

MIB = 1024 * 1024
CLIENT_TIMEOUT = 60

# A visitor that finds nothing listening must be told at once, not after a
# timeout; well under the relay's POOL_WAIT_SECONDS.
PROMPT_CLOSE_SECONDS = 5.0

TESTS_DIR = Path(__file__).resolve().parent.parent


def curl(
    relay: RelayHarness, *args: str, timeout: float = CLIENT_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--cacert", str(relay.ca), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def connect_tls(relay: RelayHarness, tunnel: burrow.Tunnel) -> ssl.SSLSocket:
    host, port = tunnel.tls_socket
    raw = socket.create_connection((names.resolve_host(host), port), timeout=CLIENT_TIMEOUT)
    context = ssl.create_default_context(cafile=str(relay.ca))
    return context.wrap_socket(raw, server_hostname=host)


def fetch_many(relay: RelayHarness, tmp_path: Path, urls: list[str]) -> list[bytes]:
    """GET every URL at once (one connection each) with curl; the bodies, in order."""
    args: list[str] = []
    for i, url in enumerate(urls):
        args += [url, "-o", str(tmp_path / f"body{i}")]
    result = curl(relay, "--fail", "--parallel", "--parallel-max", "100", *args)
    assert result.returncode == 0, result.stderr
    return [(tmp_path / f"body{i}").read_bytes() for i in range(len(urls))]


def marked_files(marker: str, count: int) -> dict[str, bytes]:
    return {f"{marker}-{i}": f"{marker} answers {i}\n".encode() for i in range(count)}


# -- isolation ------------------------------------------------------------------------


def test_two_tunnels_in_one_process_stay_apart(relay: RelayHarness, tmp_path: Path) -> None:
    count = 40
    files_a, files_b = marked_files("alpha", count), marked_files("bravo", count)
    with (
        http_server(files_a, marker="alpha-page") as server_a,
        http_server(files_b, marker="bravo-page") as server_b,
        burrow.forward(server_a.port, client=relay.client()) as tunnel_a,
        burrow.forward(server_b.port, client=relay.client()) as tunnel_b,
    ):
        assert tunnel_a.host != tunnel_b.host
        urls: list[str] = []
        expected: list[bytes] = []
        for i in range(count):
            urls += [f"{tunnel_a.url}/alpha-{i}", f"{tunnel_b.url}/bravo-{i}"]
            expected += [files_a[f"alpha-{i}"], files_b[f"bravo-{i}"]]
        assert fetch_many(relay, tmp_path, urls) == expected
        assert server_a.requests_served == count
        assert server_b.requests_served == count


SUBPROCESS_AGENT = """
import sys
from backends import http_server
import burrow

files = {f"bravo-{i}": f"bravo answers {i}\\n".encode() for i in range(int(sys.argv[1]))}
with http_server(files, marker="bravo-page") as server, burrow.forward(server.port) as tunnel:
    print(tunnel.url, flush=True)
    sys.stdin.read()  # until the test closes our stdin
    print(server.requests_served, flush=True)
"""


@contextmanager
def agent_process(relay: RelayHarness, count: int) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    env = {**os.environ, **relay.env(), "PYTHONPATH": str(TESTS_DIR)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SUBPROCESS_AGENT, str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    watchdog = threading.Timer(CLIENT_TIMEOUT, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("https://"), proc.stderr.read() if proc.stderr else ""
        yield url, proc
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_two_processes_on_one_relay_stay_apart(relay: RelayHarness, tmp_path: Path) -> None:
    count = 40
    files_a = marked_files("alpha", count)
    with (
        agent_process(relay, count) as (url_b, proc),
        http_server(files_a, marker="alpha-page") as server_a,
        burrow.forward(server_a.port, client=relay.client(relay.mint("process-a"))) as tunnel_a,
    ):
        assert tunnel_a.url != url_b
        urls: list[str] = []
        expected: list[bytes] = []
        for i in range(count):
            urls += [f"{tunnel_a.url}/alpha-{i}", f"{url_b}/bravo-{i}"]
            expected += [f"alpha answers {i}\n".encode(), f"bravo answers {i}\n".encode()]
        assert fetch_many(relay, tmp_path, urls) == expected
        # Each backend's own page, too: nothing crosses over.
        assert "alpha-page" in curl(relay, "--fail", tunnel_a.url + "/").stdout
        page_b = curl(relay, "--fail", url_b + "/").stdout
        assert "bravo-page" in page_b and "alpha" not in page_b
        assert server_a.requests_served == count + 1

        out, err = proc.communicate("", timeout=CLIENT_TIMEOUT)
        assert proc.returncode == 0, err
        assert out.strip() == str(count + 1)


# -- a local server that starts late ---------------------------------------------------


class _LateHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"late but here\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def late_http_server() -> Iterator[tuple[int, http.server.ThreadingHTTPServer]]:
    """A server bound to its port but not listening yet: call ``server_activate()`` later."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), _LateHandler, bind_and_activate=False
    )
    server.daemon_threads = True
    try:
        server.server_bind()
        yield server.server_address[1], server
    finally:
        server.server_close()


def test_https_visitor_before_the_local_server(relay: RelayHarness) -> None:
    with (
        late_http_server() as (port, server),
        burrow.forward(port, client=relay.client()) as tunnel,
    ):
        started = time.monotonic()
        early = curl(relay, tunnel.url + "/", timeout=30)
        assert early.returncode in (52, 56), early  # empty reply / connection closed
        assert early.stdout == ""
        assert time.monotonic() - started < PROMPT_CLOSE_SECONDS

        server.server_activate()
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        try:
            late = curl(relay, "--fail", tunnel.url + "/")
            assert late.returncode == 0, late.stderr
            assert late.stdout == "late but here\n"
        finally:
            server.shutdown()
            thread.join(10)


def test_tcp_visitor_before_the_local_server(relay: RelayHarness) -> None:
    reserved = socket.socket()
    reserved.bind(("127.0.0.1", 0))  # bound, not listening: connects are refused
    port = reserved.getsockname()[1]
    with reserved, burrow.forward(port, unencrypted=True, client=relay.client()) as tunnel:
        host, tcp_port = tunnel.tcp_socket
        started = time.monotonic()
        with socket.create_connection((names.resolve_host(host), tcp_port), timeout=30) as sock:
            sock.sendall(b"anyone there?")
            with suppress(ConnectionResetError):
                assert sock.recv(100) == b""
        assert time.monotonic() - started < PROMPT_CLOSE_SECONDS

        reserved.listen()
        reserved.settimeout(CLIENT_TIMEOUT)
        with socket.create_connection((names.resolve_host(host), tcp_port), timeout=30) as sock:
            sock.sendall(b"now?")
            conn, _ = reserved.accept()
            with conn:
                assert conn.recv(100) == b"now?"
                conn.sendall(b"yes")
                assert sock.recv(100) == b"yes"


# -- leaving the with block --------------------------------------------------------------


def test_exit_unpublishes_the_https_address(relay: RelayHarness) -> None:
    with http_server() as server:
        with burrow.forward(server.port, client=relay.client()) as tunnel:
            assert curl(relay, "--fail", tunnel.url + "/").returncode == 0
        gone = curl(relay, "-w", "%{http_code}", tunnel.url + "/")
        assert gone.returncode == 0, gone.stderr
        assert gone.stdout == "burrow: no tunnel at this address\n404"

        # The port can be forwarded again, under a new name.
        with burrow.forward(server.port, client=relay.client()) as again:
            assert again.host != tunnel.host
            assert server.marker in curl(relay, "--fail", again.url + "/").stdout


def test_exit_unpublishes_the_tcp_port(relay: RelayHarness) -> None:
    with tcp_echo_server() as server:
        with burrow.forward(server.port, unencrypted=True, client=relay.client()) as tunnel:
            host, port = tunnel.tcp_socket
            with socket.create_connection((names.resolve_host(host), port), timeout=30) as sock:
                sock.sendall(b"ping")
                assert sock.recv(4) == b"ping"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((names.resolve_host(host), port), timeout=30).close()


def test_exit_closes_a_download_in_flight(relay: RelayHarness) -> None:
    size = 256 * MIB
    with http_server() as server:
        with burrow.forward(server.port, client=relay.client()) as tunnel:
            sock = connect_tls(relay, tunnel)
            sock.sendall(f"GET /big?size={size} HTTP/1.1\r\nHost: {tunnel.host}\r\n\r\n".encode())
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        # Whatever was already on its way arrives; then the stream ends, short.
        received = 0
        sock.settimeout(10)
        with sock:
            try:
                while data := sock.recv(MIB):
                    received += len(data)
            except (ConnectionResetError, ssl.SSLError):
                pass
        assert received < size // 2


async def test_async_with_forward(relay: RelayHarness) -> None:
    with http_server() as server:
        async with burrow.forward(server.port, client=relay.client()) as tunnel:
            proc = await asyncio.create_subprocess_exec(
                "curl",
                "-sS",
                "--fail",
                "--cacert",
                str(relay.ca),
                tunnel.url + "/",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                out, err = await asyncio.wait_for(proc.communicate(), CLIENT_TIMEOUT)
            finally:
                if proc.returncode is None:
                    proc.kill()
            assert proc.returncode == 0, err
            assert server.marker.encode() in out
        gone = await asyncio.to_thread(curl, relay, tunnel.url + "/")
        assert "no tunnel" in gone.stdout


async def test_exit_closes_an_open_websocket(relay: RelayHarness) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    with websocket_echo_server() as server:
        async with burrow.forward(server.port, client=relay.client()) as tunnel:
            host, port = tunnel.tls_socket
            ws = await connect(
                f"wss://{host}:{port}/",
                ssl=ssl.create_default_context(cafile=str(relay.ca)),
                host=names.resolve_host(host),
                port=port,
                open_timeout=CLIENT_TIMEOUT,
            )
            await ws.send("still here?")
            assert await ws.recv() == "still here?"
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        await ws.close()
