"""AgentSession against a scripted relay: the test plays the relay's side of the
control connection, frame by frame, over real TLS on 127.0.0.1.

Also the error map (every wire code at every stage) and the ``retryable``
flags that the connect and reconnect loops read.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from burrow import __version__
from burrow.agent import session as session_module
from burrow.agent.errors import RETRYABLE_CODES, Stage, from_wire
from burrow.agent.session import AgentConfig, AgentSession
from burrow.exception import (
    AuthError,
    ConnectionError,
    Error,
    InvalidError,
    RelayError,
    TimeoutError,
)
from burrow.net import devca, tls
from burrow.wire import protocol

DOMAIN = "relay.localhost"
TOKEN = "a-token"
STEP = 5.0  # generous bound on any one step: the loopback answers in milliseconds

ALL_CODES = sorted(value for name, value in vars(protocol).items() if name.startswith("CODE_"))
STAGES: tuple[Stage, ...] = ("hello", "session", "open")
RELAY = f"{DOMAIN}:4443"


# -- the error map ---------------------------------------------------------------


def _expected(code: str, stage: Stage) -> tuple[type[Error], str, bool]:
    message = "why"
    if code == protocol.CODE_AUTH and stage == "hello":
        return AuthError, f"the relay at {RELAY} refused the token: why", False
    if code == protocol.CODE_AUTH and stage == "session":
        return AuthError, f"the relay at {RELAY} ended the session: why", False
    if code == protocol.CODE_TOKEN_EXPIRED and stage == "hello":
        return AuthError, f"the relay at {RELAY} refused the token: why", False
    if code == protocol.CODE_TOKEN_EXPIRED:  # answering an open, it ends the session too
        return AuthError, f"the relay at {RELAY} ended the session: why", False
    if code == protocol.CODE_PORT_FORWARDED and stage == "open":
        return InvalidError, "why", False
    if code == protocol.CODE_ENDED_BY_OPERATOR and stage == "session":
        return RelayError, f"the relay at {RELAY} ended the session: why", False
    if code == protocol.CODE_FULL and stage == "hello":
        return RelayError, f"the relay at {RELAY} is full: why", False
    if stage == "open":
        message = "the relay refused to open a tunnel: why"
    return RelayError, message, code == protocol.CODE_SHUTTING_DOWN


def test_only_a_stopping_relay_is_worth_another_try() -> None:
    assert protocol.CODE_SHUTTING_DOWN in ALL_CODES
    assert {protocol.CODE_SHUTTING_DOWN} == RETRYABLE_CODES


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("code", ALL_CODES)
def test_error_map(code: str, stage: Stage) -> None:
    error = from_wire(protocol.Error(id=None, code=code, message="why"), RELAY, stage)
    kind, message, retryable = _expected(code, stage)
    assert type(error) is kind
    assert str(error) == message
    assert error.retryable is retryable
    if isinstance(error, RelayError):
        assert error.code == code
        assert error.message == message


def test_an_unknown_code_is_a_relay_error_that_is_not_retried() -> None:
    error = from_wire(protocol.Error(code="from-the-future", message="?"), RELAY, "hello")
    assert isinstance(error, RelayError)
    assert error.code == "from-the-future"
    assert not error.retryable


def test_retryable_defaults() -> None:
    assert ConnectionError("gone").retryable
    assert not ConnectionError("untrusted", retryable=False).retryable
    assert str(ConnectionError("gone", retryable=False)) == "gone"
    assert not RelayError("limit", "no").retryable
    assert RelayError("shutting-down", "bye", retryable=True).retryable
    for error in (AuthError("no"), InvalidError("no"), TimeoutError("slow"), Error("?")):
        assert not error.retryable


# -- a scripted relay ------------------------------------------------------------


@dataclass
class Peer:
    """One agent connection as the relay sees it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    server_name: str | None
    connection: protocol.Connection = field(
        default_factory=lambda: protocol.Connection(protocol.Kind.CONTROL, protocol.Role.RELAY)
    )

    async def receive(self) -> protocol.Message | None:
        """The next frame from the agent, skipping its pings; ``None`` at EOF."""
        while True:
            event = self.connection.next_event()
            if isinstance(event, protocol.Ping):
                continue
            if event is not protocol.NEED_DATA:
                assert not isinstance(event, protocol.NeedData)
                return event
            data = await asyncio.wait_for(self.reader.read(65536), STEP)
            if not data:
                return None
            self.connection.receive_data(data)

    async def receive_raw(self) -> protocol.Message | None:
        """The next frame, pings included."""
        while True:
            event = self.connection.next_event()
            if event is not protocol.NEED_DATA:
                assert not isinstance(event, protocol.NeedData)
                return event
            data = await asyncio.wait_for(self.reader.read(65536), STEP)
            if not data:
                return None
            self.connection.receive_data(data)

    def send(self, message: protocol.Message) -> None:
        self.writer.write(self.connection.send(message))

    async def welcome(self, session: str = "s1", heartbeat: int = 30) -> protocol.Hello:
        hello = await self.receive()
        assert isinstance(hello, protocol.Hello)
        self.send(
            protocol.Welcome(session=session, key="k", domain=DOMAIN, heartbeat=heartbeat, pool=0)
        )
        return hello

    async def refuse(self, code: str, message: str) -> None:
        assert isinstance(await self.receive(), protocol.Hello)
        self.send(protocol.Error(code=code, message=message))
        self.writer.close()


class ScriptedRelay:
    """Accepts TLS connections on 127.0.0.1 and hands each to the test as a :class:`Peer`."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.server_names: list[str | None] = []
        # One entry per TLS handshake begun, whether it then succeeds or not.
        self.handshakes: asyncio.Queue[str | None] = asyncio.Queue()
        context.sni_callback = self._sni
        self._context = context
        self._peers: asyncio.Queue[Peer] = asyncio.Queue()
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0

    def _sni(self, obj: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> None:
        self.server_names.append(name)
        self.handshakes.put_nowait(name)

    async def start(self) -> asyncio.Server:
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=self._context)
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        await self._peers.put(Peer(reader, writer, self.server_names[-1]))

    async def accept(self) -> Peer:
        return await asyncio.wait_for(self._peers.get(), STEP)

    def close_all(self) -> None:
        for writer in self._writers:
            writer.close()

    @property
    def address(self) -> str:
        return f"{DOMAIN}:{self.port}"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> devca.DevCertificates:
    return devca.ensure_dev_certificates(tmp_path_factory.mktemp("certs"), DOMAIN)


@pytest.fixture
async def relay(certs: devca.DevCertificates) -> AsyncIterator[ScriptedRelay]:
    context = tls.server_context(certs.cert, certs.key, [protocol.ALPN_CONTROL, protocol.ALPN_DATA])
    scripted = ScriptedRelay(context)
    server = await scripted.start()
    try:
        yield scripted
    finally:
        scripted.close_all()
        server.close()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real pauses are tuned for relays restarting; these tests only count attempts.
    monkeypatch.setattr(session_module, "CONNECT_BACKOFF", 0.01)
    monkeypatch.setattr(session_module, "RECONNECT_FIRST_DELAY", 0.01)
    monkeypatch.setattr(session_module, "RECONNECT_MAX_DELAY", 0.02)


def _config(relay: ScriptedRelay, certs: devca.DevCertificates, **extra: object) -> AgentConfig:
    return AgentConfig(relay=relay.address, token=TOKEN, ca=certs.ca_cert, **extra)  # type: ignore[arg-type]


async def _connected(
    relay: ScriptedRelay, certs: devca.DevCertificates, **extra: object
) -> tuple[AgentSession, Peer]:
    connecting = asyncio.create_task(AgentSession.connect(_config(relay, certs, **extra)))
    peer = await relay.accept()
    await peer.welcome()
    return await asyncio.wait_for(connecting, STEP), peer


async def _open(session: AgentSession, peer: Peer, port: int = 8000) -> protocol.Open:
    opening = asyncio.create_task(session.open_tunnel(port, tcp=True, h2=False))
    request = await peer.receive()
    assert isinstance(request, protocol.Open)
    peer.send(
        protocol.Opened(
            id=request.id,
            host=f"abc.{DOMAIN}",
            port=443,
            tcp_host=DOMAIN,
            tcp_port=20001,
            claim="claim-1",
        )
    )
    await asyncio.wait_for(opening, STEP)
    return request


# -- hello and open --------------------------------------------------------------


async def test_hello_welcome_and_open(relay: ScriptedRelay, certs: devca.DevCertificates) -> None:
    connecting = asyncio.create_task(AgentSession.connect(_config(relay, certs, workload="w1")))
    peer = await relay.accept()
    hello = await peer.welcome(session="s1")
    assert hello == protocol.Hello(
        version=protocol.PROTOCOL_VERSION, token=TOKEN, agent=f"burrow/{__version__}", workload="w1"
    )
    assert peer.server_name == DOMAIN
    session = await asyncio.wait_for(connecting, STEP)
    try:
        assert session.session_id == "s1"
        opening = asyncio.create_task(
            session.open_tunnel(8000, tcp=True, h2=False, allow="10.0.0.0/8")
        )
        assert await peer.receive() == protocol.Open(
            id=1, local_port=8000, tcp=True, h2=False, allow="10.0.0.0/8"
        )
        peer.send(
            protocol.Opened(
                id=1, host=f"abc.{DOMAIN}", port=443, tcp_host=DOMAIN, tcp_port=20001, claim="c"
            )
        )
        tunnel = await asyncio.wait_for(opening, STEP)
        assert tunnel.host == f"abc.{DOMAIN}"
        assert tunnel.unencrypted_port == 20001
        assert tunnel.local_port == 8000
        assert session.tunnels[1].claim == "c"

        closing = asyncio.create_task(session.close_tunnel(tunnel))
        assert await peer.receive() == protocol.Close(id=1)
        peer.send(protocol.Closed(id=1))
        await asyncio.wait_for(closing, STEP)
        assert session.tunnels == {}
    finally:
        await session.close()


@pytest.mark.parametrize(
    ("code", "message", "kind", "text"),
    [
        (
            protocol.CODE_PORT_FORWARDED,
            "Port 8000 is already forwarded",
            InvalidError,
            "Port 8000 is already forwarded",
        ),
        (
            protocol.CODE_LIMIT,
            "this token may hold at most 3 tunnels",
            RelayError,
            "the relay refused to open a tunnel: this token may hold at most 3 tunnels",
        ),
    ],
)
async def test_a_refused_open_raises_and_the_session_goes_on(
    relay: ScriptedRelay,
    certs: devca.DevCertificates,
    code: str,
    message: str,
    kind: type[Error],
    text: str,
) -> None:
    session, peer = await _connected(relay, certs)
    try:
        opening = asyncio.create_task(session.open_tunnel(8000, tcp=False, h2=False))
        request = await peer.receive()
        assert isinstance(request, protocol.Open)
        peer.send(protocol.Error(id=request.id, code=code, message=message))
        with pytest.raises(kind) as info:
            await asyncio.wait_for(opening, STEP)
        assert str(info.value) == text
        assert not info.value.retryable
        assert not session.closed
        await _open(session, peer, 8001)
    finally:
        await session.close()


# -- connect: what is retried ----------------------------------------------------


async def test_a_refused_token_is_not_retried(
    relay: ScriptedRelay, certs: devca.DevCertificates
) -> None:
    connecting = asyncio.create_task(AgentSession.connect(_config(relay, certs)))
    await (await relay.accept()).refuse(protocol.CODE_AUTH, "token expired at 12:00")
    with pytest.raises(AuthError) as info:
        await asyncio.wait_for(connecting, STEP)
    assert (
        str(info.value) == f"the relay at {relay.address} refused the token: token expired at 12:00"
    )
    assert not info.value.retryable
    assert len(relay.server_names) == 1


async def test_a_stopping_relay_is_tried_again_then_reported(
    relay: ScriptedRelay, certs: devca.DevCertificates
) -> None:
    connecting = asyncio.create_task(AgentSession.connect(_config(relay, certs)))
    for _ in range(session_module.CONNECT_ATTEMPTS):
        await (await relay.accept()).refuse(
            protocol.CODE_SHUTTING_DOWN, "the relay is shutting down"
        )
    with pytest.raises(RelayError) as info:
        await asyncio.wait_for(connecting, STEP)
    assert info.value.code == protocol.CODE_SHUTTING_DOWN
    assert str(info.value) == "the relay is shutting down"
    assert info.value.retryable
    assert len(relay.server_names) == session_module.CONNECT_ATTEMPTS


async def test_a_stopping_relay_that_comes_back_is_joined(
    relay: ScriptedRelay, certs: devca.DevCertificates
) -> None:
    connecting = asyncio.create_task(AgentSession.connect(_config(relay, certs)))
    await (await relay.accept()).refuse(protocol.CODE_SHUTTING_DOWN, "the relay is shutting down")
    await (await relay.accept()).welcome(session="s2")
    session = await asyncio.wait_for(connecting, STEP)
    assert session.session_id == "s2"
    await session.close()


async def test_an_untrusted_certificate_is_not_retried(
    relay: ScriptedRelay, certs: devca.DevCertificates
) -> None:
    config = AgentConfig(relay=relay.address, token=TOKEN)  # the system store only
    with pytest.raises(ConnectionError) as info:
        await asyncio.wait_for(AgentSession.connect(config), STEP)
    message = str(info.value)
    assert message.startswith(f"could not reach the burrow relay at {relay.address} after ")
    assert "certificate we do not trust" in message
    assert "BURROW_CA" in message
    assert not info.value.retryable
    assert len(relay.server_names) == 1


async def test_an_unreachable_relay_is_tried_every_time() -> None:
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"127.0.0.1:{port}"
    with pytest.raises(ConnectionError) as info:
        await asyncio.wait_for(AgentSession.connect(AgentConfig(address, TOKEN)), STEP)
    assert str(info.value).startswith(
        f"could not reach the burrow relay at {address} after "
        f"{session_module.CONNECT_ATTEMPTS} attempts: "
    )
    assert info.value.retryable


# -- the control connection ------------------------------------------------------


async def test_pings_are_answered(relay: ScriptedRelay, certs: devca.DevCertificates) -> None:
    session, peer = await _connected(relay, certs)
    try:
        peer.send(protocol.Ping(seq=7))
        assert await peer.receive_raw() == protocol.Pong(seq=7)
    finally:
        await session.close()


async def test_an_idle_agent_pings(relay: ScriptedRelay, certs: devca.DevCertificates) -> None:
    connecting = asyncio.create_task(AgentSession.connect(_config(relay, certs)))
    peer = await relay.accept()
    await peer.welcome(heartbeat=1)
    session = await asyncio.wait_for(connecting, STEP)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        ping = await peer.receive_raw()
        assert isinstance(ping, protocol.Ping)
        assert 0.5 < loop.time() - started < 2.5
    finally:
        await session.close()


async def test_a_revoked_token_ends_the_session(
    relay: ScriptedRelay, certs: devca.DevCertificates
) -> None:
    session, peer = await _connected(relay, certs)
    opening = asyncio.create_task(session.open_tunnel(8000, tcp=False, h2=False))
    assert isinstance(await peer.receive(), protocol.Open)
    peer.send(protocol.Error(code=protocol.CODE_AUTH, message="token t1 was revoked"))
    with pytest.raises(AuthError) as info:
        await asyncio.wait_for(opening, STEP)
    assert (
        str(info.value) == f"the relay at {relay.address} ended the session: token t1 was revoked"
    )
    assert session.closed
    assert await peer.receive() is None  # the agent hung up
    assert len(relay.server_names) == 1
    await session.close()


async def test_an_expired_token_ends_the_session_for_good(
    relay: ScriptedRelay, certs: devca.DevCertificates
) -> None:
    session, peer = await _connected(relay, certs)
    opening = asyncio.create_task(session.open_tunnel(8000, tcp=False, h2=False))
    request = await peer.receive()
    assert isinstance(request, protocol.Open)
    expired = "token expired at 2026-01-01T00:01:00Z"
    peer.send(protocol.Error(id=request.id, code=protocol.CODE_TOKEN_EXPIRED, message=expired))
    peer.send(protocol.Error(code=protocol.CODE_TOKEN_EXPIRED, message=expired))
    with pytest.raises(AuthError) as info:
        await asyncio.wait_for(opening, STEP)
    assert str(info.value) == f"the relay at {relay.address} ended the session: {expired}"
    assert not info.value.retryable
    reader = session._reader
    assert reader is not None
    await asyncio.wait_for(reader, STEP)
    assert session.closed
    assert await peer.receive() is None
    assert len(relay.server_names) == 1  # and no reconnect
    await session.close()


async def test_relay_strings_are_logged_on_one_line(
    relay: ScriptedRelay, certs: devca.DevCertificates, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="burrow.agent")
    session, peer = await _connected(relay, certs)
    peer.send(protocol.Error(code="x\nfake", message="bye\n2026-01-01 ERROR burrow.agent: forged"))
    reader = session._reader
    assert reader is not None
    await asyncio.wait_for(reader, STEP)
    lines = [r.getMessage() for r in caplog.records if r.name == "burrow.agent"]
    assert any("bye\\n2026-01-01 ERROR" in line for line in lines), lines
    assert not any("\n" in line for line in lines), lines
    await session.close()


async def test_another_session_error_ends_the_session(
    relay: ScriptedRelay, certs: devca.DevCertificates
) -> None:
    session, peer = await _connected(relay, certs)
    reader = session._reader
    assert reader is not None
    peer.send(protocol.Error(code=protocol.CODE_PROTOCOL, message="bad frame"))
    await asyncio.wait_for(reader, STEP)  # ends the session on its way out
    assert session.closed
    assert await peer.receive() is None
    with pytest.raises(ConnectionError, match="is closed"):
        await session.open_tunnel(8000, tcp=False, h2=False)
    await session.close()


# -- losing the session and getting it back ---------------------------------------


@pytest.mark.parametrize("tcp_port", [20002, None])
async def test_a_tunnel_whose_tcp_port_cannot_come_back_keeps_its_name(
    relay: ScriptedRelay,
    certs: devca.DevCertificates,
    caplog: pytest.LogCaptureFixture,
    tcp_port: int | None,
) -> None:
    caplog.set_level(logging.WARNING, logger="burrow.agent")
    session, peer = await _connected(relay, certs)
    try:
        first = await _open(session, peer)
        await _lose(peer, "closed")
        again = await relay.accept()
        await again.welcome(session="s2")
        reopen = await again.receive()
        assert isinstance(reopen, protocol.Open) and reopen.claim == "claim-1"
        again.send(
            protocol.Opened(
                id=reopen.id,
                host=f"abc.{DOMAIN}",
                port=443,
                tcp_host=DOMAIN if tcp_port else None,
                tcp_port=tcp_port,
                claim="claim-2",
            )
        )
        await _open(session, again, 8001)
        kept = session.tunnels[first.id]
        assert kept.claim == "claim-2"
        assert kept.tunnel.host == f"abc.{DOMAIN}"
        now = f"now {DOMAIN}:{tcp_port}" if tcp_port else "it has none now"
        assert any(
            f"abc.{DOMAIN}" in r.getMessage()
            and "TCP port 20001" in r.getMessage()
            and now in r.getMessage()
            for r in caplog.records
        ), caplog.text
    finally:
        await session.close()


async def _lose(peer: Peer, how: str) -> None:
    if how == "shutting-down":
        peer.send(protocol.Error(code=protocol.CODE_SHUTTING_DOWN, message="the relay is stopping"))
    elif how == "closed":
        peer.writer.close()
    else:
        peer.writer.write(b"\xff" * 16)  # a frame no agent can parse


@pytest.mark.parametrize("how", ["shutting-down", "closed", "garbage"])
async def test_a_lost_session_comes_back_with_its_tunnels(
    relay: ScriptedRelay, certs: devca.DevCertificates, how: str
) -> None:
    session, peer = await _connected(relay, certs)
    try:
        first = await _open(session, peer)
        await _lose(peer, how)

        again = await relay.accept()
        assert again.server_name == f"s1.{DOMAIN}"  # back to the worker that holds our names
        await again.welcome(session="s2")
        reopen = await again.receive()
        assert reopen == protocol.Open(
            id=first.id, local_port=8000, tcp=True, h2=False, claim="claim-1"
        )
        assert isinstance(reopen, protocol.Open)
        again.send(
            protocol.Opened(
                id=reopen.id,
                host=f"abc.{DOMAIN}",
                port=443,
                tcp_host=DOMAIN,
                tcp_port=20001,
                claim="claim-2",
            )
        )
        await _open(session, again, 8001)  # the reopen's reply was handled before this one
        assert session.reconnects == 1
        assert session.session_id == "s2"
        assert session.tunnels[first.id].claim == "claim-2"
        assert not session.closed
    finally:
        await session.close()


async def test_reconnecting_goes_on_while_the_relay_is_stopping(
    relay: ScriptedRelay, certs: devca.DevCertificates
) -> None:
    session, peer = await _connected(relay, certs)
    try:
        peer.writer.close()
        for _ in range(3):
            await (await relay.accept()).refuse(protocol.CODE_SHUTTING_DOWN, "still stopping")
        await (await relay.accept()).welcome(session="s2")
        await asyncio.wait_for(session._connected.wait(), STEP)
        assert not session.closed
        assert session.session_id == "s2"
    finally:
        await session.close()


async def test_reconnecting_goes_on_at_the_session_limit(
    relay: ScriptedRelay, certs: devca.DevCertificates
) -> None:
    # The relay may still count the lost session against the token's limit
    # until that session's heartbeat runs out.
    session, peer = await _connected(relay, certs)
    try:
        peer.writer.close()
        await (await relay.accept()).refuse(protocol.CODE_LIMIT, "at most 1 sessions at once")
        await (await relay.accept()).welcome(session="s2")
        await asyncio.wait_for(session._connected.wait(), STEP)
        assert not session.closed
        assert session.session_id == "s2"
    finally:
        await session.close()


@pytest.mark.parametrize(
    ("code", "kind"),
    [(protocol.CODE_AUTH, AuthError), (protocol.CODE_VERSION, RelayError)],
)
async def test_reconnecting_stops_at_a_refusal_that_will_not_change(
    relay: ScriptedRelay, certs: devca.DevCertificates, code: str, kind: type[Error]
) -> None:
    session, peer = await _connected(relay, certs)
    try:
        await _open(session, peer)
        peer.writer.close()
        # The agent dials again only once it knows the session is lost, so from
        # here on _connected is set again only by success or by the end.
        await (await relay.accept()).refuse(code, "no")
        await asyncio.wait_for(session._connected.wait(), STEP)
        assert session.closed
        assert session.tunnels == {}
        with pytest.raises(ConnectionError, match="is closed"):
            await session.open_tunnel(8000, tcp=False, h2=False)
        assert len(relay.server_names) == 2
    finally:
        await session.close()


async def test_reconnecting_stops_at_an_untrusted_certificate(
    relay: ScriptedRelay, certs: devca.DevCertificates, tmp_path: Path
) -> None:
    session, peer = await _connected(relay, certs)
    try:
        # The relay comes back with a certificate from a CA we were never told about.
        other = devca.ensure_dev_certificates(tmp_path / "other", DOMAIN)
        relay._context.load_cert_chain(other.cert, other.key)
        peer.writer.close()
        for _ in range(2):  # the first session's, then the failed reconnect's
            await asyncio.wait_for(relay.handshakes.get(), STEP)
        await asyncio.wait_for(session._connected.wait(), STEP)
        assert session.closed
        assert len(relay.server_names) == 2
    finally:
        await session.close()
