"""examples/tcp_echo: bytes through the raw TCP socket, a large payload and half-close."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading

import pytest
from backends import free_port
from devrelay import DevRelay
from examplerun import EXAMPLES, StartExample

from burrow.wire import names

PAYLOAD = 16 * 1024 * 1024  # several times every buffer on the way: back-pressure must work
SOCKET_TIMEOUT = 30.0  # no single send or receive may stall longer


@pytest.fixture
def echo_address(dev: DevRelay, start_example: StartExample) -> tuple[str, int]:
    """(host, port) of the example's raw TCP socket, host as a visitor resolves it."""
    echo = start_example(
        [sys.executable, "echo.py"],
        env=dev.env(PORT=str(free_port())),
        cwd=EXAMPLES / "tcp_echo",
    )
    match = echo.wait_for_line(r"^tcp://([^:\s]+):(\d+)$")
    assert match.group(1) == "r1.localhost"
    return names.resolve_host(match.group(1)), int(match.group(2))


def _connect(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=SOCKET_TIMEOUT)
    sock.settimeout(SOCKET_TIMEOUT)
    return sock


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size and (chunk := sock.recv(size - len(data))):
        data += chunk
    return data


def _read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def test_echo_and_half_close(echo_address: tuple[str, int]) -> None:
    with _connect(echo_address) as sock:
        sock.sendall(b"hello, echo\n")
        assert _recv_exactly(sock, 12) == b"hello, echo\n"
        # After our EOF the other direction stays open: the echo of bytes sent just
        # before it still arrives, and then the server's own EOF.
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)
        assert _read_to_eof(sock) == b"last words"


def test_large_payload_comes_back_whole(echo_address: tuple[str, int]) -> None:
    data = os.urandom(PAYLOAD)
    errors: list[BaseException] = []

    with _connect(echo_address) as sock:

        def send() -> None:
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
            except BaseException as exc:
                errors.append(exc)

        # Write and read at once: the echo fills the buffers long before we finish.
        sender = threading.Thread(target=send, name="sender")
        sender.start()
        try:
            received = _read_to_eof(sock)
        finally:
            sender.join(SOCKET_TIMEOUT)
    assert not errors, errors
    assert len(received) == len(data)
    assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()


def test_visitors_at_once_get_their_own_bytes(echo_address: tuple[str, int]) -> None:
    socks = [_connect(echo_address) for _ in range(8)]
    try:
        for i, sock in enumerate(socks):
            sock.sendall(f"visitor {i}".encode())
            sock.shutdown(socket.SHUT_WR)
        for i, sock in enumerate(socks):
            assert _read_to_eof(sock) == f"visitor {i}".encode()
    finally:
        for sock in socks:
            sock.close()
