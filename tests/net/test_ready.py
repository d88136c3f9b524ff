"""Readiness: waiting for the server behind a tunnel, on real sockets and a real relay."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from backends import free_port
from harness import RelayHarness

import burrow
from burrow.exception import InvalidError, NotReadyError
from burrow.net import ready

# -- the HTTP status line, sans I/O ----------------------------------------------


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"HTTP/1.1 200 OK\r\n", 200),
        (b"HTTP/1.0 503 Service Unavailable\r\nServer: x\r\n\r\n", 503),
        (b"HTTP/1.1 404\r\n", 404),
    ],
)
def test_parse_status_whole_and_byte_by_byte(data: bytes, status: int) -> None:
    assert ready.parse_status(data) == status
    for end in range(len(data)):
        if b"\r\n" not in data[:end]:
            assert ready.parse_status(data[:end]) is None


@pytest.mark.parametrize(
    "data", [b"SSH-2.0-OpenSSH\r\n", b"\x15\x03\x03", b"HTTP/1.1 abc\r\n", b"HTTP/1.1 42\r\n"]
)
def test_parse_status_refuses_what_is_not_http(data: bytes) -> None:
    with pytest.raises(ValueError):
        ready.parse_status(data)


def test_parse_status_refuses_an_endless_line() -> None:
    with pytest.raises(ValueError):
        ready.parse_status(b"HTTP/1.1 " + b"2" * ready.MAX_STATUS_LINE)


@pytest.mark.parametrize("path", ["health", "/a b", "/x\r\nHost: evil"])
def test_http_path_must_be_a_plain_path(path: str) -> None:
    with pytest.raises(InvalidError, match="http_path"):
        ready.http_request(path, 80)


# -- against real servers ---------------------------------------------------------


class _Flaky(http.server.BaseHTTPRequestHandler):
    healthy = threading.Event()

    def do_GET(self) -> None:
        status = 200 if self.healthy.is_set() else 503
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def _flaky_server(port: int) -> Iterator[type[_Flaky]]:
    handler = type("Handler", (_Flaky,), {"healthy": threading.Event()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()


def test_tunnel_wait_ready(relay: RelayHarness) -> None:
    port = free_port()
    with burrow.forward(port, client=relay.client()) as tunnel:
        assert tunnel.local_port == port
        # Nothing listens yet: a clear error naming the port, the URL and the timeout.
        with pytest.raises(NotReadyError) as info:
            tunnel.wait_ready(timeout=0.2)
        message = str(info.value)
        assert f"Port {port} ({tunnel.url})" in message
        assert "within 0.2s" in message and "connection refused" in message
        assert info.value.port == port and info.value.url == tunnel.url
        assert isinstance(info.value, burrow.exception.TimeoutError)

        with _flaky_server(port) as handler:
            tunnel.wait_ready(timeout=30)  # the TCP check passes at once
            with pytest.raises(NotReadyError, match="GET /health answered 503"):
                tunnel.wait_ready(timeout=0.2, http_path="/health")
            handler.healthy.set()
            tunnel.wait_ready(timeout=30, http_path="/health")


def test_wait_ready_waits_for_a_server_that_starts_later(relay: RelayHarness) -> None:
    port = free_port()
    listening = threading.Event()
    go = threading.Event()
    with burrow.forward(port, client=relay.client()) as tunnel:

        def start_late() -> None:
            go.wait()
            with socket.create_server(("127.0.0.1", port)) as server:
                listening.set()
                server.settimeout(30)
                conn, _ = server.accept()
                conn.close()

        thread = threading.Thread(target=start_late)
        thread.start()
        go.set()
        tunnel.wait_ready(timeout=30)
        thread.join()
        assert listening.is_set()


def test_wait_ready_finds_a_server_on_ipv6_loopback_only(relay: RelayHarness) -> None:
    try:
        server = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with server, burrow.forward(server.getsockname()[1], client=relay.client()) as tunnel:
        tunnel.wait_ready(timeout=30)


async def test_wait_ready_async(relay: RelayHarness) -> None:
    port = free_port()
    async with burrow.forward(port, client=relay.client()) as tunnel:
        with pytest.raises(NotReadyError):
            await tunnel.wait_ready.aio(timeout=0.1)
        with _flaky_server(port) as handler:
            handler.healthy.set()
            await tunnel.wait_ready.aio(timeout=30, http_path="/")
        # The blocking form refuses to block an event loop.
        with pytest.raises(InvalidError, match=r"wait_ready\.aio"):
            tunnel.wait_ready(timeout=1)


def test_wait_ready_needs_a_tunnel_from_forward() -> None:
    with pytest.raises(InvalidError, match="local port"):
        burrow.Tunnel(host="x.r1.localhost", port=443).wait_ready(timeout=1)


def test_wait_ready_refuses_a_bad_timeout(relay: RelayHarness) -> None:
    with burrow.forward(free_port(), client=relay.client()) as tunnel:
        with pytest.raises(InvalidError, match="timeout"):
            tunnel.wait_ready(timeout=-1)
        with pytest.raises(InvalidError, match="timeout"):
            tunnel.wait_ready(timeout="soon")  # type: ignore[arg-type]
