"""The relay: one public TLS port for visitors and agents, plus raw TCP ports.

Every connection to the public port is sorted by its TLS server name (SNI)
and ALPN: the relay's own name with a burrow ALPN id is an agent's control
or data connection; ``<label>.<domain>`` is a visitor for that tunnel.
"What happens when a visitor arrives" is :meth:`Relay.serve_visitor`; "an
agent says hello" is :meth:`Relay._serve_control`.

The policy lives beside it: :mod:`~burrow.relay.admission` (who may come
in), :mod:`~burrow.relay.registry` (sessions and routes),
:mod:`~burrow.relay.claims` and :mod:`~burrow.relay.ports`; one agent's
session is :mod:`~burrow.relay.session`. This module does the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import socket
import ssl
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from burrow import tokens
from burrow.exception import ConnectionError, RemoteProtocolError
from burrow.net.channel import Channel
from burrow.net.splice import Splice, join
from burrow.net.stream import Stream, TlsStream
from burrow.net.tasks import TaskSet
from burrow.relay import certs, claimsecret
from burrow.relay.admission import Admission
from burrow.relay.certs import CertificateFiles, TlsContexts
from burrow.relay.claims import ClaimSigner
from burrow.relay.config import POOL_WAIT_SECONDS, RelayConfig
from burrow.relay.fleetfile import FleetFile
from burrow.relay.handshakes import Handshakes
from burrow.relay.logs import BoundedLog
from burrow.relay.metrics import RelayMetrics
from burrow.relay.ports import Listener, TcpPorts
from burrow.relay.quota import TokenQuotas
from burrow.relay.registry import Registry, RelayTunnel
from burrow.relay.revocation import REVOCATION_CHECK_SECONDS, AnyOf, RevocationList
from burrow.relay.session import RelaySession
from burrow.relay.workers import Worker
from burrow.wire import allowlist, names, protocol
from burrow.wire.clienthello import ClientHello
from burrow.wire.h2 import Inspector as H2Inspector
from burrow.wire.text import loggable

log = logging.getLogger("burrow.relay")

# Only for bench/h2_inspection.py, which measures what the HTTP/2 check costs:
# "1" turns it off, and with it the guarantee that one tunnel's visitors' requests
# never reach another tunnel (docs/security.md). Never set it on a real relay.
_INSPECT_H2: Final = os.environ.get("BURROW_BENCH_NO_H2_INSPECTION") != "1"

# The answer to anyone who speaks plain HTTP to the TLS port.
_PLAIN_HTTP_BODY: Final = b"burrow: this port speaks HTTPS; use https://\n"
PLAIN_HTTP_REPLY: Final = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\nconnection: close\r\n"
    + f"content-length: {len(_PLAIN_HTTP_BODY)}\r\n\r\n".encode()
    + _PLAIN_HTTP_BODY
)

_NOT_FOUND_BODY: Final = b"burrow: no tunnel at this address\n"
NOT_FOUND_REPLY: Final = (
    b"HTTP/1.1 404 Not Found\r\ncontent-type: text/plain\r\nconnection: close\r\n"
    + f"content-length: {len(_NOT_FOUND_BODY)}\r\n\r\n".encode()
    + _NOT_FOUND_BODY
)

# The answer to a visitor whose address the tunnel's allowlist leaves out.
_FORBIDDEN_BODY: Final = b"burrow: this tunnel does not accept visitors from your address\n"
FORBIDDEN_REPLY: Final = (
    b"HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\nconnection: close\r\n"
    + f"content-length: {len(_FORBIDDEN_BODY)}\r\n\r\n".encode()
    + _FORBIDDEN_BODY
)

# The first frame (hello or attach) must come soon after the handshake.
FIRST_FRAME_TIMEOUT: Final = 10.0

# Connections the kernel queues before we accept them. asyncio's default of
# 100 overflows under a burst of visitors (a dropped SYN costs the visitor a
# one-second retransmit); the kernel caps it at net.core.somaxconn anyway.
LISTEN_BACKLOG: Final = 4096


def _visitor_kind(visitor: Stream) -> str:
    """``https``, ``h2`` or ``tcp``: how a visitor came (metrics.VISITOR_KINDS)."""
    if not isinstance(visitor, TlsStream):
        return "tcp"
    return "h2" if visitor.alpn == "h2" else "https"


class Relay:
    """A running relay. Use ``await Relay.start(config)`` and ``await relay.close()``.

    As one of several worker processes (``worker``), it serves the labels
    and sessions it owns and passes other visitors to their owner.
    """

    def __init__(self, config: RelayConfig, worker: Worker | None = None) -> None:
        self.config = config
        self.worker = worker
        self.domain = names.normalize_domain(config.domain)
        paths = config.public_key if isinstance(config.public_key, tuple) else (config.public_key,)
        keys = tokens.read_public_keys(paths)
        self.revoked = RevocationList(config.revoked_tokens) if config.revoked_tokens else None
        self.fleet = FleetFile(config.fleet, keys) if config.fleet else None
        self.tcp_host = config.tcp_host or self.domain
        self.public_port = config.public_port or 0
        self.plain_port: int | None = None
        self._servers: list[asyncio.Server] = []
        self._tasks = TaskSet()
        self.started = time.time()
        self.metrics = RelayMetrics()
        # Refusals: anyone who can connect can cause them, so their lines are bounded.
        self.refusals = BoundedLog(log)
        # Unfinished handshakes, oldest first (dicts keep insertion order).
        self._handshaking: Handshakes[TlsStream] = Handshakes(
            config.max_pending_handshakes, config.max_pending_handshakes_per_source
        )

        # The TLS contexts in use, one object: a new certificate replaces it whole
        # (use_certificate), and _new_public_stream and _pick_context read it.
        self._tls: TlsContexts = certs.load(
            config.cert, config.key, self.domain, self._pick_context, strict=False
        )
        self._cert_files = CertificateFiles(config.cert, config.key, self._load_certificate)

        quotas = TokenQuotas(
            config.max_tunnels_per_token,
            config.tunnel_creations_per_second,
            config.tunnel_creation_burst,
        )
        index, count = (worker.index, worker.count) if worker else (0, 1)
        # Each worker its own share of the TCP range: a port one worker keeps for
        # a lost session's token is not another worker's to give away.
        self.tcp_ports = TcpPorts(
            [host for host, _ in config.listen], config.tcp_ports, share=(index, count)
        )
        self.registry = Registry(
            self.domain, quotas, worker_index=index, worker_count=count, ports=self.tcp_ports
        )
        # Not the TLS key: a renewal with a new key must not void the claims agents hold.
        self.claims = ClaimSigner(claimsecret.load_or_create(config.state_dir, config.key))
        self.admission = Admission(
            config,
            keys,
            quotas,
            self.claims,
            revoked=AnyOf(*(s for s in (self.revoked, self.fleet) if s is not None)),
            owns=self.registry.owns,
            routes=self.registry.routes,
            metrics=self.metrics,
        )

    @classmethod
    async def start(
        cls,
        config: RelayConfig,
        *,
        worker: Worker | None = None,
        sockets: list[socket.socket] | None = None,
    ) -> Relay:
        """Listen on ``config.listen``, or on ``sockets`` already listening (the workers')."""
        relay = cls(config, worker)
        await relay._listen(sockets)
        return relay

    # -- listeners ------------------------------------------------------------

    async def _listen(self, sockets: list[socket.socket] | None) -> None:
        loop = asyncio.get_running_loop()
        if sockets is None:
            for host, port in self.config.listen:
                await self.add_listener(host, port)
        else:
            for sock in sockets:
                self._servers.append(
                    await loop.create_server(
                        self._new_public_stream, sock=sock, backlog=LISTEN_BACKLOG
                    )
                )
        if not self.public_port:
            self.public_port = self.bound_port
        self._tasks.spawn(self._sweep_sessions())
        self._tasks.spawn(self._watch_certificate())
        if self.worker is not None:
            loop.add_reader(self.worker.inbox.fileno(), self._adopt_handed_off)
        if self.config.plain_data_listen is not None:
            host, port = self.config.plain_data_listen
            if port and self.worker is not None:
                port += self.worker.index  # the agent's welcome names its session's worker's port
            server = await loop.create_server(
                self._new_plain_data_stream, host, port, backlog=LISTEN_BACKLOG
            )
            self._servers.append(server)
            self.plain_port = server.sockets[0].getsockname()[1]
            log.warning(
                "relay %s takes plaintext data connections on %s:%s: trusted networks only",
                self.domain,
                host,
                self.plain_port,
            )

    async def add_listener(self, host: str, port: int) -> None:
        """Serve the public TLS port on one more address."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            self._new_public_stream, host, port, backlog=LISTEN_BACKLOG
        )
        self._servers.append(server)
        for sock in server.sockets:
            log.info("relay %s listening on %s", self.domain, sock.getsockname()[:2])

    @property
    def listening(self) -> list[tuple[str, int]]:
        """(host, port) of every public listening socket."""
        return [
            (sock.getsockname()[0], sock.getsockname()[1])
            for server in self._servers
            for sock in server.sockets
        ]

    @property
    def bound_port(self) -> int:
        """The port of the first public listener (useful with port 0)."""
        port: int = self._servers[0].sockets[0].getsockname()[1]
        return port

    @property
    def routes(self) -> Mapping[str, RelayTunnel]:
        """The registry's route table, tunnels by label (read-only; ``registry`` has the rest)."""
        return self.registry.routes

    @property
    def handshakes_pending(self) -> int:
        """Connections whose TLS handshake, or an agent's first frame, is not done."""
        return len(self._handshaking)

    @property
    def shutting_down(self) -> bool:
        return self.admission.shutting_down

    async def close(self) -> None:
        self.admission.shutting_down = True
        if self.worker is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.worker.inbox.fileno())
        for server in self._servers:
            server.close()
        for session in list(self.registry.sessions.values()):
            session.close()
        self._tasks.cancel()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()

    async def drain(self) -> None:
        """Shut down gently: no new agents, tunnels or visitors; agents are told to
        reconnect; connections in flight may finish for ``config.drain_timeout``
        seconds; then close."""
        self.admission.shutting_down = True
        for server in self._servers:
            server.close()
        in_flight: set[Splice] = set()
        for session in list(self.registry.sessions.values()):
            for tunnel in self.registry.tunnels_of(session).values():
                in_flight |= {splice for splice in tunnel.splices if not splice.done}
            session.leave("the relay is shutting down: reconnect")
        log.info("draining %d connections", len(in_flight))
        all_ended = asyncio.Event()
        left = set(in_flight)

        def ended(splice: Splice) -> None:
            left.discard(splice)
            if not left:
                all_ended.set()

        for splice in in_flight:
            splice.add_done_callback(ended)
        if in_flight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_ended.wait(), self.config.drain_timeout)
        if left:
            log.warning("closing %d connections still open after the drain", len(left))
        for splice in list(left):
            splice.close()
        await self.close()

    # -- the public port: TLS and who is calling ---------------------------

    def _new_public_stream(self, prelude: bytes = b"") -> TlsStream:
        routing = self.worker is not None and self.worker.count > 1 and not prelude
        stream = TlsStream(
            self._tls.agent,
            server_side=True,
            on_handshake=self._on_handshake,
            handshake_timeout=self.config.handshake_timeout,
            plain_reply=PLAIN_HTTP_REPLY,
            on_client_hello=self._route if routing else None,
            prelude=prelude,
            on_connected=self._placed,
        )
        self._drop_handshakes(self._handshaking.add(stream))
        return stream

    def _placed(self, stream: Stream) -> None:
        """A public connection's address is known: past its source's cap, its oldest goes."""
        assert isinstance(stream, TlsStream)
        peer = stream.transport.get_extra_info("peername") if stream.transport else None
        if peer:
            self._drop_handshakes(self._handshaking.place(stream, str(peer[0])))

    def _drop_handshakes(self, dropped: list[TlsStream]) -> None:
        self.metrics.handshakes["dropped"] += len(dropped)
        for oldest in dropped:
            log.debug("dropping the oldest unfinished TLS handshake, from %s", oldest.peername)
            oldest.abort()

    def _pick_context(
        self, ssl_object: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext
    ) -> int | None:
        """SNI callback: our own name keeps the agent context; a label gets a visitor one.

        Always the contexts in use now: a connection accepted before a new
        certificate came, whose ClientHello comes after, gets the new one.
        """
        name = names.server_name(server_name)
        if name is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        ssl_object.burrow_server_name = name  # type: ignore[attr-defined]
        contexts = self._tls
        label = None if name == self.domain else names.label_of(name, self.domain)
        if label is None and name != self.domain:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        # A label that is no tunnel: an agent naming its session so that the relay's
        # workers can route it (see _on_handshake), or a visitor who will get a 404.
        tunnel = None if label is None else self.registry.routes.get(label)
        if tunnel is not None:
            ssl_object.context = contexts.visitor_h2 if tunnel.h2 else contexts.visitor
        elif context is not contexts.agent:
            ssl_object.context = contexts.agent
        return None

    def _on_handshake(self, stream: TlsStream, exc: BaseException | None) -> None:
        """The TLS handshake is done: a visitor of a tunnel, an agent, or a 404.

        An agent's connection stays with the unfinished handshakes (their caps,
        in total and per source) until its first frame: until then it is anyone's.
        """
        metrics = self.metrics
        if exc is not None:
            # One the caps dropped is no longer among the unfinished: it was counted then.
            if stream in self._handshaking:
                self._handshaking.discard(stream)
                metrics.handshakes["timeout" if isinstance(exc, TimeoutError) else "failed"] += 1
            log.debug("TLS handshake from %s failed: %s", stream.peername, loggable(exc))
            return
        metrics.handshakes["ok"] += 1
        metrics.handshake_time.observe(time.monotonic() - stream.created)
        if stream.alpn not in (protocol.ALPN_CONTROL, protocol.ALPN_DATA):
            self._handshaking.discard(stream)
        stream.pause_reading()
        name = stream.server_name
        label = names.label_of(name, self.domain) if name and name != self.domain else None
        tunnel = self.registry.routes.get(label) if label else None
        if tunnel is not None:
            self._handshaking.discard(stream)
            if self._refused_by_allowlist(tunnel, stream, _visitor_kind(stream)):
                stream.resume_reading()
                if stream.alpn != "h2":  # an HTTP/1.1 answer would be garbage to h2
                    stream.write(FORBIDDEN_REPLY)
                stream.close_lingering()
                return
            self._tasks.spawn(self.serve_visitor(tunnel, stream))
            return
        # Agents use the relay's own name, or `<session>.<domain>` so that the
        # relay's workers route them; the burrow ALPN ids say which connection it is
        # (only the agent context offers them, never a tunnel's).
        alpn = stream.alpn
        if alpn == protocol.ALPN_CONTROL:
            self._tasks.spawn(self._serve_control(stream))
        elif alpn == protocol.ALPN_DATA:
            self._tasks.spawn(self._serve_data(stream))
        else:
            self._refuse(_visitor_kind(stream), "unknown-name", stream, "no tunnel at this name")
            stream.resume_reading()
            stream.write(NOT_FOUND_REPLY)
            stream.close_lingering()

    # -- visitors -------------------------------------------------------------

    async def serve_visitor(self, tunnel: RelayTunnel, visitor: Stream) -> None:
        """Join a visitor to the tunnel's agent through a fresh data connection."""
        visitor.pause_reading()
        kind = _visitor_kind(visitor)
        limit = self.config.max_connections_per_tunnel
        if len(tunnel.splices) + tunnel.waiting >= limit:
            self.refusals.warning(
                "tunnel %s: %d visitors already, turning %s away",
                tunnel.host,
                limit,
                visitor.peername,
            )
            self._refuse(kind, "over-limit", visitor, f"the tunnel has {limit} visitors already")
            visitor.abort()
            return
        waited = time.monotonic()
        tunnel.waiting += 1
        try:
            data = await tunnel.session.take_data_connection(
                POOL_WAIT_SECONDS, lambda: not (tunnel.closed or visitor.closed)
            )
        except asyncio.CancelledError:  # the relay is closing: so is the visitor
            visitor.close()
            raise
        finally:
            tunnel.waiting -= 1
        if data is None:
            if not tunnel.closed and not visitor.closed and not tunnel.session.closed:
                self.refusals.warning(
                    "tunnel %s: no data connection from the agent in %.0fs, turning %s away",
                    tunnel.host,
                    POOL_WAIT_SECONDS,
                    visitor.peername,
                )
                self._refuse(
                    kind,
                    "no-data-connection",
                    visitor,
                    f"no data connection from the agent in {POOL_WAIT_SECONDS:.0f}s",
                )
            else:
                self.metrics.count_visitor(kind, "gone")
            visitor.close()
            return
        self.metrics.count_visitor(kind, "joined")
        self.metrics.data_connection_wait.observe(time.monotonic() - waited)
        data.send(protocol.Bind(id=tunnel.id, visitor=visitor.peername))

        def done(splice: Splice) -> None:
            tunnel.splices.discard(splice)
            to_agent, to_visitor = splice.bytes_a_to_b, splice.bytes_b_to_a
            for carried in (tunnel.carried, tunnel.session.carried):
                carried[0] += to_agent
                carried[1] += to_visitor
            self.metrics.bytes_to_agent += to_agent
            self.metrics.bytes_to_visitor += to_visitor

        splice = join(visitor, data.stream, on_done=done, inspector=self._h2_check(visitor))
        tunnel.splices.add(splice)
        splice.start()

    def _h2_check(self, visitor: Stream) -> H2Inspector | None:
        """For an HTTP/2 visitor, what refuses requests for other names (421).

        Tunnels share one certificate and address, so browsers coalesce: they
        send a request for one tunnel's name on a connection to another's
        (RFC 9113 §9.1.1), cookies and all. Reading each request's authority is
        the relay's one look above layer 4, and it only refuses (wire/h2.py).
        Browsers pool HTTP/1.1 connections per origin, so only h2 needs it;
        raw TCP has no names.
        """
        if not _INSPECT_H2 or not isinstance(visitor, TlsStream) or visitor.alpn != "h2":
            return None
        return H2Inspector(visitor.server_name or "", frozenset({self.public_port}))

    def _new_tcp_visitor(self, tunnel: RelayTunnel) -> Stream:
        def connected(stream: Stream) -> None:
            if tunnel.closed:
                self.metrics.count_visitor("tcp", "gone")
                stream.abort()
            elif self._refused_by_allowlist(tunnel, stream, "tcp"):
                stream.close()
            else:
                self._tasks.spawn(self.serve_visitor(tunnel, stream))

        return Stream(on_connected=connected)

    def _refused_by_allowlist(self, tunnel: RelayTunnel, visitor: Stream, kind: str) -> bool:
        """Whether the tunnel's allowlist leaves the visitor's address out (logged, counted)."""
        if tunnel.allow is None:
            return False
        peer = visitor.transport.get_extra_info("peername") if visitor.transport else None
        host = peer[0] if isinstance(peer, tuple) and isinstance(peer[0], str) else ""
        if allowlist.allows(tunnel.allow, host):
            return False
        self.refusals.info(
            "visitor %s refused by the allowlist of %s", visitor.peername, tunnel.host
        )
        self._refuse(kind, "allowlist", visitor, "its address is not in the tunnel's allowlist")
        return True

    def _refuse(self, kind: str, result: str, visitor: Stream, message: str) -> None:
        """Count a visitor turned away, and keep it among the last refusals."""
        self.metrics.count_visitor(kind, result)
        self.metrics.refused(time.time(), result, visitor.peername, message)

    async def open_tcp_port(self, tunnel: RelayTunnel, port: int | None = None) -> None:
        """Listen for this tunnel on ``port`` (its claim's), or on a free port of the TCP
        range; the registry gives the port back when the tunnel is unpublished."""
        loop = asyncio.get_running_loop()
        owner = tunnel.session.grant.token_id

        async def bind(host: str, candidate: int) -> Listener:
            return await loop.create_server(
                lambda: self._new_tcp_visitor(tunnel), host, candidate, backlog=LISTEN_BACKLOG
            )

        tunnel.tcp_port, tunnel.tcp_servers = await self.tcp_ports.bind(bind, port, owner=owner)
        if tunnel.closed:  # unpublished while its port was being bound
            for server in tunnel.tcp_servers:
                server.close()
            self.tcp_ports.release(tunnel.tcp_port, owner)

    # -- agents ---------------------------------------------------------------

    async def _first_frame(self, channel: Channel) -> protocol.Message | None:
        try:
            message = await asyncio.wait_for(channel.receive(), FIRST_FRAME_TIMEOUT)
        except (TimeoutError, RemoteProtocolError, ConnectionError) as exc:
            self._handshook(channel.stream)
            self.refusals.info(
                "agent %s: no valid first frame: %s", channel.stream.peername, loggable(exc)
            )
            self.metrics.count_auth_failure("no-first-frame")
            if isinstance(exc, RemoteProtocolError):
                channel.refuse(protocol.Error(code=protocol.CODE_PROTOCOL, message=str(exc)))
            else:
                channel.close()
            return None
        self._handshook(channel.stream)
        if message is None:  # closed (or close_notify) before saying anything
            channel.close()
        return message

    def _handshook(self, stream: Stream) -> None:
        """An agent's connection has said its first frame (or is over): off the caps."""
        if isinstance(stream, TlsStream):
            self._handshaking.discard(stream)

    async def _serve_control(self, stream: TlsStream) -> None:
        """An agent's control connection: admit it with ``hello``, then serve its session."""
        channel = Channel(stream, protocol.Connection(protocol.Kind.CONTROL, protocol.Role.RELAY))
        stream.resume_reading()
        hello = await self._first_frame(channel)
        if hello is None:
            return
        assert isinstance(hello, protocol.Hello)  # the state table allows nothing else first
        self.check_revoked_tokens()  # a token revoked a moment ago is refused at once
        grant = self.admission.check_hello(hello)
        if not isinstance(grant, protocol.Error):
            token_id = grant.token_id
            held = sum(s.grant.token_id == token_id for s in self.registry.sessions.values())
            grant = self.admission.check_sessions(held) or grant
        if not isinstance(grant, protocol.Error):
            workers = self.worker.count if self.worker is not None else 1
            full = self.admission.check_capacity(len(self.registry.sessions), workers=workers)
            grant = full or grant
        if isinstance(grant, protocol.Error):
            self.refusals.warning("agent %s refused: %s", stream.peername, loggable(grant.message))
            self.metrics.refused(time.time(), "agent-refused", stream.peername, grant.code)
            channel.refuse(grant)
            return
        session = RelaySession(
            self, channel, grant, hello.workload, peer=stream.peername, agent=hello.agent
        )
        self.registry.add_session(session)
        log.info(
            "session %s for %s from %s (%s)",
            session.id,
            loggable(grant.subject),
            stream.peername,
            loggable(hello.agent),
        )
        channel.send(
            protocol.Welcome(
                session=session.id,
                key=session.key,
                domain=self.domain,
                heartbeat=self.config.heartbeat,
                pool=self.config.pool_size,
                plain_port=self.plain_port,
                data_name=f"{session.id}.{self.domain}",
                fleet=self.fleet.offer(hello.fleet_serial) if self.fleet is not None else None,
            )
        )
        await session.run()

    async def _serve_data(self, stream: Stream) -> None:
        """A data connection: it must ``attach`` to a session, then waits in its pool."""
        channel = Channel(stream, protocol.Connection(protocol.Kind.DATA, protocol.Role.RELAY))
        stream.resume_reading()
        attach = await self._first_frame(channel)
        if attach is None:
            return
        assert isinstance(attach, protocol.Attach)
        session = self.registry.sessions.get(attach.session)
        if session is None or not hmac.compare_digest(attach.key.encode(), session.key.encode()):
            self.refusals.warning("data connection from %s refused: bad attach", stream.peername)
            self.metrics.count_auth_failure("bad-attach")
            self.metrics.refused(time.time(), "bad-attach", stream.peername, "bad attach")
            channel.refuse(
                protocol.Error(
                    code=protocol.CODE_BAD_ATTACH, message="unknown session or wrong key"
                )
            )
            return
        if channel.has_pending():
            # Bytes behind attach: the agent may not speak before bind.
            self.refusals.warning(
                "data connection from %s refused: spoke before bind", stream.peername
            )
            stream.abort()
            return
        log.debug("data connection from %s attached to session %s", stream.peername, session.id)
        # The channel's protocol state stays POOLED until serve_visitor binds it.
        session.add_data_connection(channel)

    def _new_plain_data_stream(self) -> Stream:
        def connected(stream: Stream) -> None:
            self._tasks.spawn(self._serve_data(stream))

        return Stream(on_connected=connected)

    # -- the certificate ------------------------------------------------------

    @property
    def certificate(self) -> certs.Certificate:
        """The certificate new handshakes get."""
        return self._tls.certificate

    def use_certificate(self, cert: Path, key: Path) -> certs.Certificate:
        """Serve ``cert`` (PEM chain, leaf first) with ``key`` from the next handshake on.

        The install API for new certificates (ACME, or anyone else). Both files
        are read and checked: the key must be the certificate's, which must
        cover ``<domain>`` and ``*.<domain>`` and be valid now. Then the relay's
        TLS contexts are replaced in one step; connections in flight keep the
        TLS state they have. From then on these two paths are the ones watched
        for changes (every ``CERT_CHECK_SECONDS``). A pair that fails is
        refused with one warning line in the log, the certificate in use stays,
        and :class:`~burrow.relay.certs.CertificateError` (an ``InvalidError``)
        is raised. Synchronous, a few milliseconds; call it on the relay's
        event loop (from another thread, through ``loop.call_soon_threadsafe``).
        This process only: other workers see the change through their own
        watch of the files, so write the new pair to the watched paths.
        """
        try:
            contexts = self._load_certificate(cert, key)
        except certs.CertificateError as exc:
            log.warning("refused the new certificate, still serving the last good one: %s", exc)
            raise
        self._cert_files.follow(cert, key)
        self._swap(contexts)
        return contexts.certificate

    def check_certificate_files(self) -> None:
        """Serve the certificate and key files anew if they were replaced and pass the checks."""
        contexts = self._cert_files.poll()
        if contexts is not None:
            self._swap(contexts)

    def _load_certificate(self, cert: Path, key: Path) -> TlsContexts:
        return certs.load(cert, key, self.domain, self._pick_context)

    def _swap(self, contexts: TlsContexts) -> None:
        old, self._tls = self._tls, contexts
        log.info(
            "TLS certificate %s in use for new handshakes: %s (was serial %x)",
            contexts.cert,
            contexts.certificate.describe(),
            old.certificate.serial,
        )

    async def _watch_certificate(self) -> None:
        while True:
            await asyncio.sleep(certs.CERT_CHECK_SECONDS)
            self.check_certificate_files()

    # -- revoked tokens -------------------------------------------------------

    async def _sweep_sessions(self) -> None:
        """End the sessions whose token was revoked or has expired since their hello."""
        while True:
            await asyncio.sleep(REVOCATION_CHECK_SECONDS)
            self.check_revoked_tokens()
            self.check_expired_tokens()

    def check_expired_tokens(self) -> None:
        """End every session whose token has expired (beyond the leeway)."""
        for session in list(self.registry.sessions.values()):
            ended = self.admission.check_session(session.grant)
            if ended is None or session.closed:
                continue
            log.warning(
                "session %s for %s ended: %s",
                session.id,
                loggable(session.grant.subject),
                ended.message,
            )
            session.end(ended)

    def check_revoked_tokens(self) -> None:
        """Re-read the revoked-tokens file and the fleet document if they changed; end
        newly revoked tokens' sessions."""
        newly_revoked: frozenset[str] = frozenset()
        if self.revoked is not None:
            newly_revoked |= self.revoked.refresh()
        if self.fleet is not None:
            newly_revoked |= self.fleet.refresh()
        if not newly_revoked:
            return
        for session in list(self.registry.sessions.values()):
            token_id = session.grant.token_id
            if token_id not in newly_revoked:
                continue
            log.warning(
                "session %s for %s ended: token %s was revoked",
                session.id,
                loggable(session.grant.subject),
                loggable(token_id),
            )
            session.end(
                protocol.Error(code=protocol.CODE_AUTH, message=f"token {token_id} was revoked")
            )

    # -- workers: every name to the process that owns it -----------------------

    def _route(self, stream: TlsStream, hello: ClientHello, prelude: bytes) -> bool:
        """Pass a connection whose server name another worker owns to that worker."""
        worker = self.worker
        label = names.label_of(hello.server_name, self.domain)
        if worker is None or label is None:
            return False  # the relay's own name (an agent's control connection) or junk
        owner = names.worker_of(label, worker.count)
        if owner == worker.index or not stream.can_detach():
            return False
        self._handshaking.discard(stream)
        worker.hand_off(owner, stream.hand_off(), prelude)
        return True

    def _adopt_handed_off(self) -> None:
        assert self.worker is not None
        loop = asyncio.get_running_loop()
        for sock, prelude in self.worker.receive():
            if self.shutting_down:
                sock.close()
                continue
            self._tasks.spawn(self._adopt(loop, sock, prelude))

    async def _adopt(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes
    ) -> None:
        try:
            await loop.connect_accepted_socket(lambda: self._new_public_stream(data), sock)
        except OSError as exc:
            log.debug("a connection handed over was gone: %s", exc)
            sock.close()
