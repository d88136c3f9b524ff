"""Silent sockets against a real ``burrow dev`` relay process: what each costs, who is dropped.

Anyone can open sockets to the relay's public port and send nothing, or
send a ClientHello and stop there. Each test floods a fresh relay process
(bounded in count and time), reads its memory from /proc, and checks that
another tenant's tunnel answers every request all the while. The flood
comes from 127.0.x.y addresses of its own; the tenant's visitors and agent
use 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from backends import http_server
from devrelay import DevRelay, dev_relay

import burrow
from burrow.relay.config import (
    HANDSHAKE_MEMORY_BUDGET,
    MAX_PENDING_HANDSHAKES,
    MAX_PENDING_HANDSHAKES_PER_SOURCE,
)

KIB = 1024
MIB = 1024 * KIB

# Connections from one source address in the floods that must not reach its cap.
PER_SOURCE = 250
# How long a flood may take to be accepted, and its evictions to show.
SETTLE_SECONDS = 60.0


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def _rss(pid: int) -> int:
    return _status_kib(pid, "VmRSS:") * KIB


def _open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


@pytest.fixture(autouse=True)
def _enough_descriptors() -> None:
    # 10,000 sockets here and as many in the relay, which inherits the limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 12_000 if hard == resource.RLIM_INFINITY else min(hard, 12_000)
    if want < 12_000:
        pytest.skip(f"the open-file limit ({hard}) is too low for the flood")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[DevRelay]:
    # Only the caps may close a silent socket here, not the handshake timeout.
    with dev_relay(tmp_path, "--handshake-timeout", "600") as running:
        yield running


@dataclass
class Tally:
    answered: int = 0
    failed: int = 0
    last_error: str = ""


@contextlib.contextmanager
def other_tenant(relay: DevRelay) -> Iterator[Tally]:
    """Another tenant's tunnel, asked for a page over and over on fresh connections."""
    tally = Tally()
    stop = threading.Event()
    context = ssl.create_default_context(cafile=relay.ca)
    with (
        http_server(files={"ok": b"still served\n"}) as server,
        burrow.forward(
            server.port,
            client=burrow.Client(
                relay=relay.settings["BURROW_RELAY"],
                token=relay.settings["BURROW_TOKEN"],
                ca=relay.ca,
            ),
        ) as tunnel,
    ):
        host = tunnel.url.removeprefix("https://").partition(":")[0]

        def ask() -> None:
            while not stop.is_set():
                try:
                    with (
                        socket.create_connection(("127.0.0.1", relay.port), timeout=30) as raw,
                        context.wrap_socket(raw, server_hostname=host) as tls,
                    ):
                        tls.sendall(f"GET /ok HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                        reply = b""
                        while not reply.endswith(b"still served\n"):
                            chunk = tls.recv(4096)
                            if not chunk:
                                break
                            reply += chunk
                    if reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"still served\n"):
                        tally.answered += 1
                    else:
                        tally.failed += 1
                        tally.last_error = repr(reply[:200])
                except (OSError, ssl.SSLError) as exc:
                    tally.failed += 1
                    tally.last_error = repr(exc)

        asker = threading.Thread(target=ask, daemon=True)
        asker.start()
        try:
            yield tally
        finally:
            stop.set()
            asker.join(timeout=60)
    assert tally.answered > 0
    assert tally.failed == 0, f"{tally.failed} of the tenant's requests failed: {tally.last_error}"


def _client_hello() -> bytes:
    """The bytes of a real ClientHello for a tunnel name, sent as is by every flooding socket."""
    context = ssl.create_default_context()
    outgoing = ssl.MemoryBIO()
    client = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="flood.r1.localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def _flood(port: int, count: int, sources: list[str], first: bytes = b"") -> list[socket.socket]:
    """``count`` connections, ``count / len(sources)`` from each source; each sends ``first``."""
    socks = []
    for i in range(count):
        sock = socket.socket()
        sock.bind((sources[i * len(sources) // count], 0))
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.connect(("127.0.0.1", port))
        socks.append(sock)
    if first:
        for sock in socks:
            sock.setblocking(True)
            sock.sendall(first)
            sock.setblocking(False)
    return socks


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        while True:  # what the relay sent first (its half of a handshake) does not count
            if not sock.recv(65536):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def _sources(third: int, count: int) -> list[str]:
    return [f"127.0.{third}.{n}" for n in range(1, count + 1)]


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SETTLE_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {SETTLE_SECONDS:g} s: {what}")
        time.sleep(0.05)


def _close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def test_a_silent_socket_costs_the_relay_little(relay: DevRelay) -> None:
    pid, count = relay.process.pid, 2000
    with other_tenant(relay):
        before_rss, before_fds = _rss(pid), _open_fds(pid)
        socks = _flood(relay.port, count, _sources(1, count // PER_SOURCE))
        try:
            _wait_for(lambda: _open_fds(pid) >= before_fds + count, "the relay accepts them all")
            per_connection = (_rss(pid) - before_rss) / count
            print(f"\nrelay RSS per silent socket: {per_connection / KIB:.1f} KiB, {count} sockets")
            # Before TLS state waited for a ClientHello, each cost about 45 KiB.
            assert per_connection < 12 * KIB
            assert not any(_closed_by_peer(sock) for sock in socks)
        finally:
            _close_all(socks)


def test_one_source_past_its_cap_loses_its_own_oldest(relay: DevRelay) -> None:
    cap, extra = MAX_PENDING_HANDSHAKES_PER_SOURCE, 100
    with other_tenant(relay):
        socks = _flood(relay.port, cap + extra, ["127.0.0.2"])
        try:
            _wait_for(
                lambda: sum(_closed_by_peer(sock) for sock in socks[:extra]) == extra,
                f"the oldest {extra} from the source are dropped",
            )
            # The newest stay: dropping the oldest sufficed, and nobody else was touched.
            assert not any(_closed_by_peer(sock) for sock in socks[extra:])
        finally:
            _close_all(socks)


@pytest.mark.parametrize("first", [b"", _client_hello()], ids=["silent", "client-hello"])
def test_ten_thousand_sockets_stay_within_the_memory_budget(relay: DevRelay, first: bytes) -> None:
    pid, count = relay.process.pid, 10_000
    assert count > MAX_PENDING_HANDSHAKES
    with other_tenant(relay) as tally:
        before_rss = _rss(pid)
        # Many sources, none past its own cap: only the total cap holds them back.
        socks = _flood(relay.port, count, _sources(3, count // PER_SOURCE + 1), first)
        try:
            dropped = count - MAX_PENDING_HANDSHAKES
            _wait_for(
                lambda: sum(_closed_by_peer(sock) for sock in socks) >= dropped,
                "the oldest past the total cap are dropped",
            )
            grown = _rss(pid) - before_rss
            print(
                f"\n{count} sockets ({'silent' if not first else 'after a ClientHello'}): relay "
                f"RSS +{grown / MIB:.0f} MiB (budget {HANDSHAKE_MEMORY_BUDGET / MIB:.0f} MiB), "
                f"the other tenant answered {tally.answered}/{tally.answered + tally.failed}"
            )
            assert grown < HANDSHAKE_MEMORY_BUDGET
        finally:
            _close_all(socks)
