"""Log lines are a resource too: a peer that is refused again and again cannot flood the log.

Each refusal (a bad token, a bad attach, a visitor the allowlist leaves out)
is logged, and anyone who can reach the relay can cause one per connection.
The relay logs a bounded number of each kind and then counts the rest.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import DOMAIN, RelayHarness, run_relay

from burrow.relay.logs import REFUSAL_LINES_BURST
from burrow.wire import protocol

FLOOD = 300
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayHarness]:
    with run_relay(tmp_path_factory.mktemp("log-flood")) as relay:
        yield relay


def refused_hello(relay: RelayHarness, context: ssl.SSLContext) -> dict[str, object]:
    """One control connection with a bad token; the relay's error frame."""
    raw = socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT)
    with context.wrap_socket(raw, server_hostname=DOMAIN) as sock:
        body = json.dumps(
            {"type": "hello", "version": protocol.PROTOCOL_VERSION, "token": "x", "agent": "a"}
        ).encode()
        sock.sendall(struct.pack("!I", len(body)) + body)
        head = b""
        while len(head) < 4:
            chunk = sock.recv(4 - len(head))
            assert chunk, "the relay closed without an error frame"
            head += chunk
        (length,) = struct.unpack("!I", head)
        payload = b""
        while len(payload) < length:
            chunk = sock.recv(length - len(payload))
            assert chunk
            payload += chunk
    message: dict[str, object] = json.loads(payload)
    return message


def refusal_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "burrow.relay" and "refused" in r.getMessage()
    ]


def test_a_flood_of_bad_tokens_logs_a_bounded_number_of_lines(
    relay: RelayHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="burrow.relay")
    context = ssl.create_default_context(cafile=str(Path(relay.ca)))
    context.set_alpn_protocols([protocol.ALPN_CONTROL])
    for _ in range(FLOOD):
        # Every peer still gets its answer: only the log is bounded.
        assert refused_hello(relay, context)["code"] == protocol.CODE_AUTH
    lines = refusal_lines(caplog)
    # The burst, and the few the rate lets through while the flood lasts.
    assert REFUSAL_LINES_BURST <= len(lines) < FLOOD // 3, lines[-3:]
    # Once the rate allows one more line, it says how many were not logged.
    caplog.clear()
    time.sleep(1.0)
    assert refused_hello(relay, context)["code"] == protocol.CODE_AUTH
    lines = refusal_lines(caplog)
    assert len(lines) == 1
    assert "more like it, not logged" in lines[0]
