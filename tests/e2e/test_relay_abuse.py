"""Hostile tenants and visitors against a real relay: floods that must cost it bounded
memory and descriptors, while another tenant's tunnel keeps serving.

Each flood is bounded in count; each runs beside a second tenant (another
token) whose tunnel is asked for a page again and again throughout, and
every one of those requests must be answered. RSS and descriptor counts are
this test process's (read from /proc/self): the relay runs in a thread of
it, as do the agents, so a figure covers relay and agents together.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from backends import http_server
from e2e.test_relay_security import TIMEOUT, RawConnection, frame, raw_session, wait_until
from harness import RelayHarness, run_relay

import burrow
from burrow import Tunnel, tokens
from burrow.exception import RelayError
from burrow.net import channel as channel_module
from burrow.net.limits import raise_open_file_limit
from burrow.relay.config import MAX_SESSIONS_PER_TOKEN, POOL_SIZE
from burrow.relay.session import RelaySession
from burrow.wire import protocol

# -- measuring -----------------------------------------------------------------------


def rss_mib() -> float:
    """This process's resident memory (the relay's thread included), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def report(what: str, **figures: object) -> None:
    """Figures for the closing note; shown with ``pytest -s``."""
    shown = ", ".join(f"{name}={value}" for name, value in figures.items())
    print(f"\n[abuse] {what}: {shown}")


# -- the other tenant ----------------------------------------------------------------


def fetch(relay: RelayHarness, host: str, path: str = "/") -> bytes:
    """One HTTPS request on a fresh connection (so a fresh data connection); the reply."""
    context = ssl.create_default_context(cafile=str(relay.ca))
    with (
        socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=host) as sock,
    ):
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        reply = bytearray()
        while chunk := sock.recv(65536):
            reply += chunk
        return bytes(reply)


@dataclass
class OtherTenant:
    """A second token's tunnel, asked for its page in a loop while a flood runs."""

    relay: RelayHarness
    tunnel: Tunnel
    marker: str
    answered: int = 0
    failed: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                reply = fetch(self.relay, self.tunnel.host)
            except OSError as exc:
                self.failed.append(repr(exc))
                continue
            if reply.startswith(b"HTTP/1.1 200") and self.marker.encode() in reply:
                self.answered += 1
            else:
                self.failed.append(reply[:80].decode(errors="replace"))

    def check(self) -> str:
        """Every request answered (and at least a few made); the success rate, shown."""
        if not self._stop.is_set():  # a short flood: let it make a few
            wait_until(lambda: self.answered + len(self.failed) >= 3, "three requests")
        total = self.answered + len(self.failed)
        assert total >= 3, f"the other tenant made only {total} requests"
        failed = len(self.failed)
        assert not failed, f"the other tenant failed {failed}/{total}: {self.failed[:3]}"
        return f"{self.answered}/{total}"


@contextlib.contextmanager
def other_tenant(relay: RelayHarness) -> Iterator[OtherTenant]:
    with (
        http_server(marker="other-tenant-page") as server,
        burrow.forward(server.port, client=relay.client(relay.mint("other-tenant"))) as tunnel,
    ):
        tenant = OtherTenant(relay, tunnel, "other-tenant-page")
        assert tenant.marker.encode() in fetch(relay, tunnel.host)
        thread = threading.Thread(target=tenant.run, name="other-tenant", daemon=True)
        thread.start()
        try:
            yield tenant
        finally:
            tenant._stop.set()
            thread.join(TIMEOUT * 2)


# -- looking at the relay --------------------------------------------------------------


def session_of(relay: RelayHarness, token: str) -> RelaySession:
    token_id = tokens.token_id_of(token)

    async def find() -> RelaySession:
        (session,) = [
            s
            for s in relay.relay.registry.sessions.values()
            if isinstance(s, RelaySession) and s.grant.token_id == token_id
        ]
        return session

    return relay.call(find())


def pooled(relay: RelayHarness, session: RelaySession) -> int:
    async def count() -> int:
        return len(session._pool)

    return relay.call(count())


def waiting(relay: RelayHarness, session: RelaySession) -> int:
    async def count() -> int:
        return sum(tunnel.waiting for tunnel in session.tunnels.values())

    return relay.call(count())


def reset_after_handshake(relay: RelayHarness, host: str, context: ssl.SSLContext) -> None:
    """A visitor that completes TLS and resets at once."""
    raw = socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT)
    try:
        sock = context.wrap_socket(raw, server_hostname=host)
    except OSError:
        raw.close()
        raise
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# -- finding: visitors that reset grow the pool ------------------------------------------


RESETTING_VISITORS = 600


def test_visitors_that_reset_do_not_grow_the_data_connection_pool(tmp_path: Path) -> None:
    with (
        run_relay(tmp_path) as relay,
        http_server(marker="tenant-a-page") as server,
        other_tenant(relay) as other,
    ):
        token = relay.mint("tenant-a")
        with burrow.forward(server.port, client=relay.client(token)) as tunnel:
            session = session_of(relay, token)
            wait_until(lambda: pooled(relay, session) == POOL_SIZE, "the pool to fill")
            files_before, rss_before = open_files(), rss_mib()
            context = ssl.create_default_context(cafile=str(relay.ca))
            for _ in range(RESETTING_VISITORS):
                reset_after_handshake(relay, tunnel.host, context)
            assert b"tenant-a-page" in fetch(relay, tunnel.host)  # A still serves
            # Every reset visitor's data connection was either never bound (and
            # stayed in the pool, unreplaced) or bound and replaced once.
            seen: dict[str, int] = {}

            def settled() -> bool:
                seen.update(pooled=pooled(relay, session), open_files=open_files())
                return seen["pooled"] <= POOL_SIZE and seen["open_files"] <= files_before + 8

            try:
                wait_until(settled, "the pool and the open files to come back")
            finally:
                report(
                    f"{RESETTING_VISITORS} resetting visitors",
                    open_files_before=files_before,
                    **seen,
                    rss_before_mib=f"{rss_before:.0f}",
                    rss_after_mib=f"{rss_mib():.0f}",
                    other_tenant=f"{other.answered}/{other.answered + len(other.failed)}",
                )
    assert other.check()


def test_a_pool_holds_no_more_than_its_size_plus_visitors_waiting(
    tmp_path: Path,
) -> None:
    with run_relay(tmp_path) as relay, other_tenant(relay) as other:
        token = relay.mint("hoarder")
        with raw_session(relay, token) as agent:
            session = session_of(relay, token)
            extra = 3
            connections = [agent.attach(relay) for _ in range(POOL_SIZE + extra)]
            try:
                # The relay keeps its pool's size and closes the rest at once.
                wait_until(lambda: pooled(relay, session) == POOL_SIZE, "the pool to be full")
                for connection in connections[POOL_SIZE:]:
                    assert connection.receive() is None, "an extra data connection was kept"
                assert pooled(relay, session) == POOL_SIZE
            finally:
                for connection in connections:
                    connection.close()
        report("a pool over its size", other_tenant=other.check())


def test_pooled_connections_idle_too_long_are_closed(tmp_path: Path) -> None:
    with run_relay(tmp_path, pool_idle_timeout=0.5) as relay:
        token = relay.mint("idle")
        with raw_session(relay, token) as agent:
            data = agent.attach(relay)
            try:
                assert data.receive() is None  # closed by the relay
                # Not replaced while no visitor comes...
                assert not agent.control.has_pending()
                opened = agent.open(1)
                assert opened["type"] == "opened", opened
                context = ssl.create_default_context(cafile=str(relay.ca))
                raw = socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT)
                with context.wrap_socket(raw, server_hostname=opened["host"]):
                    # ...and asked for again when one does.
                    assert agent.control.reply("dial")["count"] >= 1
            finally:
                data.close()


# -- finding: no back-pressure on control connections ----------------------------------------


PING_FLOOD_BYTES = 64 * 1024 * 1024


def _ping_batch(count: int) -> bytes:
    return b"".join(frame({"type": "ping", "seq": seq}) for seq in range(count))


def test_a_control_connection_that_reads_nothing_stops_being_read(tmp_path: Path) -> None:
    with run_relay(tmp_path) as relay, other_tenant(relay) as other:
        rss_before = rss_mib()
        with raw_session(relay, relay.mint("mute")) as agent:
            batch = _ping_batch(20_000)
            agent.control.sock.settimeout(2.0)
            sent = 0
            with contextlib.suppress(TimeoutError, ssl.SSLWantWriteError):
                while sent < PING_FLOOD_BYTES:
                    agent.control.sock.sendall(batch)
                    sent += len(batch)
            rss_flood = rss_mib()
            report(
                "ping flood, nothing read",
                sent_mib=f"{sent / 2**20:.1f}",
                rss_before_mib=f"{rss_before:.0f}",
                rss_during_mib=f"{rss_flood:.0f}",
                other_tenant=f"{other.answered}/{other.answered + len(other.failed)}",
            )
            # The relay stopped reading (so our writes stopped) long before the flood's end.
            assert sent < PING_FLOOD_BYTES // 4, f"the relay read {sent >> 20} MiB of pings"
        other.check()


def test_a_session_that_leaves_too_much_unread_is_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Below the write high-water mark, so that the limit and not the pause acts.
    monkeypatch.setattr(channel_module, "MAX_UNSENT_BYTES", 64 * 1024, raising=False)
    with run_relay(tmp_path) as relay, other_tenant(relay) as other:
        token = relay.mint("mute")
        with raw_session(relay, token) as agent:
            agent.control.sock.settimeout(2.0)
            with contextlib.suppress(TimeoutError, ssl.SSLError, OSError):
                for _ in range(50):
                    agent.control.sock.sendall(_ping_batch(20_000))
            wait_until(
                lambda: not relay.call(_has_session_of(relay, tokens.token_id_of(token))),
                "the session to end",
            )
        report("unread output over the limit", other_tenant=other.check())


async def _has_session_of(relay: RelayHarness, token_id: str) -> bool:
    return any(s.grant.token_id == token_id for s in relay.relay.registry.sessions.values())


# -- finding: visitors waiting when a session ends ------------------------------------------


async def _end(session: RelaySession) -> None:
    session.end(protocol.Error(code=protocol.CODE_AUTH, message="token revoked"))


async def _leave(session: RelaySession) -> None:
    session.leave("the relay is shutting down: reconnect")


@pytest.mark.parametrize("how", ["agent-leaves", "revoked", "drain"])
def test_visitors_waiting_when_a_session_ends_are_closed_at_once(
    tmp_path: Path, how: str
) -> None:
    with run_relay(tmp_path) as relay:
        token = relay.mint("leaving")
        context = ssl.create_default_context(cafile=str(relay.ca))
        with raw_session(relay, token) as agent:
            opened = agent.open(1)
            assert opened["type"] == "opened", opened
            session = session_of(relay, token)
            visitors = []
            for _ in range(3):  # no data connection comes: they wait
                raw = socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT)
                visitor = context.wrap_socket(raw, server_hostname=opened["host"])
                visitor.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                visitors.append(visitor)
            wait_until(lambda: waiting(relay, session) == 3, "the visitors to wait")
            if how == "agent-leaves":
                agent.control.close()
            elif how == "revoked":
                relay.call(_end(session))
            else:
                relay.call(_leave(session))
            for visitor in visitors:
                with visitor, contextlib.suppress(ConnectionResetError, ssl.SSLEOFError):
                    assert visitor.recv(1) == b""  # a reset is a close too


# -- decision: sessions per token -------------------------------------------------------------


def test_sessions_per_token_are_capped(tmp_path: Path) -> None:
    with run_relay(tmp_path, max_sessions_per_token=3) as relay, other_tenant(relay) as other:
        token = relay.mint("many")
        with contextlib.ExitStack() as stack:
            for _ in range(3):
                stack.enter_context(raw_session(relay, token))
            with RawConnection(relay, protocol.ALPN_CONTROL) as control:
                control.send(
                    type="hello", version=protocol.PROTOCOL_VERSION, token=token, agent="test"
                )
                error = control.reply("error", "welcome")
                assert error["type"] == "error" and error["code"] == protocol.CODE_LIMIT, error
                assert "3 sessions" in error["message"]
                assert control.receive() is None
            with raw_session(relay, relay.mint("another")):
                pass  # another token has its own count
        # The three are gone: a new one is welcome.
        wait_until(lambda: not relay.call(_has_session_of(relay, tokens.token_id_of(token))), "")
        with raw_session(relay, token):
            pass
        report("sessions per token", other_tenant=other.check())


SESSION_FLOOD = 400


def test_a_flood_of_one_tokens_sessions_stops_at_its_limit(tmp_path: Path) -> None:
    raise_open_file_limit()
    with run_relay(tmp_path) as relay, other_tenant(relay) as other:
        token = relay.mint("flood")
        rss_before = rss_mib()
        welcomed, refused = [], 0
        try:
            for _ in range(SESSION_FLOOD):
                control = RawConnection(relay, protocol.ALPN_CONTROL)
                control.send(
                    type="hello", version=protocol.PROTOCOL_VERSION, token=token, agent="flood"
                )
                reply = control.reply("welcome", "error")
                if reply["type"] == "welcome":
                    welcomed.append(control)
                    continue
                assert reply["code"] == protocol.CODE_LIMIT, reply
                refused += 1
                control.close()
            rss_flood = rss_mib()
            assert len(welcomed) == MAX_SESSIONS_PER_TOKEN
            assert refused == SESSION_FLOOD - MAX_SESSIONS_PER_TOKEN
            report(
                f"{SESSION_FLOOD} sessions of one token",
                welcomed=len(welcomed),
                refused=refused,
                rss_before_mib=f"{rss_before:.0f}",
                rss_during_mib=f"{rss_flood:.0f}",
                other_tenant=other.check(),
            )
        finally:
            for control in welcomed:
                control.close()


def test_forward_at_the_session_limit_is_a_relay_error(tmp_path: Path) -> None:
    with run_relay(tmp_path, max_sessions_per_token=1) as relay:
        token = relay.mint("one")
        with raw_session(relay, token), pytest.raises(RelayError) as info:  # noqa: SIM117
            with burrow.forward(9, client=relay.client(token)):
                pass
        assert info.value.code == protocol.CODE_LIMIT
