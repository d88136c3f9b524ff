"""One agent session at the relay: its control connection, tunnels and data-connection pool."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from burrow.exception import (
    ConnectionError,
    InvalidError,
    LocalProtocolError,
    RemoteProtocolError,
)
from burrow.net.channel import Channel
from burrow.net.splice import Splice
from burrow.net.stream import Chunk, Stream
from burrow.tokens import TokenClaims
from burrow.wire import allowlist, protocol

if TYPE_CHECKING:
    from burrow.relay.server import Relay

log = logging.getLogger("burrow.relay")


@dataclass(eq=False)
class RelayTunnel:
    """A published tunnel, as the relay routes it."""

    session: Session
    id: int
    label: str
    host: str
    h2: bool
    local_port: int
    tcp_port: int | None = None
    tcp_servers: list[asyncio.Server] = field(default_factory=list)
    splices: set[Splice] = field(default_factory=set)
    waiting: int = 0
    """Visitors waiting for a data connection."""
    closed: bool = False
    allow: tuple[allowlist.Network, ...] | None = None
    """The networks visitors may come from; None lets everyone in, () no one."""


class _Pooled:
    """Receiver of an idle data connection: it may only close while it waits."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def on_data(self, stream: Stream, data: Chunk) -> None:
        # The agent may not speak before bind; treat it as broken.
        self.session.drop_pooled(stream)
        stream.abort()

    def on_eof(self, stream: Stream) -> None:
        self.session.drop_pooled(stream)
        stream.close()

    def on_close(self, stream: Stream, exc: BaseException | None) -> None:
        self.session.drop_pooled(stream)

    def on_pause_writing(self, stream: Stream) -> None:
        pass

    def on_resume_writing(self, stream: Stream) -> None:
        pass


class Session:
    """Everything the relay holds for one authenticated agent."""

    def __init__(
        self, relay: Relay, channel: Channel, claims: TokenClaims, workload: str | None = None
    ) -> None:
        self.relay = relay
        self.channel = channel
        self.claims = claims
        # The `burrow run` workload the agent's process belongs to: its ports are its own.
        self.workload = workload
        self.id = relay.new_name()
        self.key = secrets.token_urlsafe(32)
        self.tunnels: dict[int, RelayTunnel] = {}
        self._pool: collections.deque[Channel] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[Channel]] = collections.deque()
        self._pooled_receiver = _Pooled(self)
        self._leaving = False
        self.closed = False

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.claims.subject}>"

    # -- control connection -----------------------------------------------

    async def run(self) -> None:
        """Serve the control connection until it ends; then free everything."""
        config = self.relay.config
        heartbeat = protocol.Heartbeat(config.heartbeat, time.monotonic())
        try:
            while True:
                timeout = max(0.0, heartbeat.deadline() - time.monotonic())
                try:
                    message = await asyncio.wait_for(self.channel.receive(), timeout)
                except TimeoutError:
                    ping = heartbeat.poll(time.monotonic())
                    if ping is not None:
                        self.channel.send(ping)
                    continue
                if message is None:
                    return
                heartbeat.received(time.monotonic())
                await self._handle(message)
        except protocol.HeartbeatTimeout as exc:
            log.info("session %s: heartbeat missed: %s", self.id, exc)
        except RemoteProtocolError as exc:
            log.info("session %s: protocol error: %s", self.id, exc)
            self._send_quietly(protocol.Error(code=protocol.CODE_PROTOCOL, message=str(exc)))
        except ConnectionError as exc:
            log.info("session %s: %s", self.id, exc)
        finally:
            self.close()

    def _send_quietly(self, message: protocol.Message) -> None:
        with contextlib.suppress(LocalProtocolError):
            self.channel.send(message)

    async def _handle(self, message: protocol.Message) -> None:
        match message:
            case protocol.Open():
                await self._open(message)
            case protocol.Close(id=tunnel_id):
                tunnel = self.tunnels.get(tunnel_id)
                if tunnel is None:
                    self.channel.send(
                        protocol.Error(
                            id=tunnel_id,
                            code=protocol.CODE_BAD_REQUEST,
                            message=f"no tunnel {tunnel_id} in this session",
                        )
                    )
                    return
                self.relay.unpublish(tunnel)
                self.channel.send(protocol.Closed(id=tunnel_id))
            case protocol.Ping(seq=seq):
                self.channel.send(protocol.Pong(seq=seq))
            case protocol.Pong():
                pass
            case _:  # pragma: no cover - the protocol's state table forbids the rest
                raise RemoteProtocolError(f"unexpected {message.TYPE}")

    async def _open(self, message: protocol.Open) -> None:
        def refuse(code: str, text: str) -> None:
            self.channel.send(protocol.Error(id=message.id, code=code, message=text))

        if message.id in self.tunnels:
            refuse(protocol.CODE_BAD_REQUEST, f"tunnel id {message.id} is already in use")
            return
        config = self.relay.config
        if len(self.tunnels) >= config.max_tunnels_per_session:
            refuse(
                protocol.CODE_LIMIT,
                f"this session may hold at most {config.max_tunnels_per_session} tunnels",
            )
            return
        token = self.claims.token_id
        limit = config.max_tunnels_per_token
        if self.claims.max_tunnels is not None:
            limit = min(limit, self.claims.max_tunnels)
        if self.relay.quotas.holds(token) >= limit:
            refuse(protocol.CODE_LIMIT, f"this token may hold at most {limit} tunnels")
            return
        if message.claim is None and not self.relay.quotas.may_create(token, time.monotonic()):
            refuse(
                protocol.CODE_LIMIT,
                f"this token opens tunnels too fast: at most "
                f"{config.tunnel_creations_per_second:g} a second",
            )
            return
        if self.relay.shutting_down:
            refuse(protocol.CODE_SHUTTING_DOWN, "the relay is shutting down")
            return
        try:
            allow = allowlist.from_wire(message.allow)  # checked again: agents are not trusted
        except InvalidError as exc:
            refuse(protocol.CODE_BAD_REQUEST, str(exc))
            return
        claimed: tuple[str, int | None] = (self.relay.new_name(), None)
        if message.claim is not None:
            checked = self.relay.check_claim(message.claim, self.claims.token_id)
            if checked is None:
                refuse(protocol.CODE_CLAIM, "the claim is not valid for this token on this relay")
                return
            claimed = checked
            held = self.relay.routes.get(claimed[0])
            if held is not None:
                # Only the same token can sign the claim: its old session (lost,
                # and not yet timed out) lets the name go to the new one.
                log.info("session %s takes %s back from %s", self.id, held.host, held.session.id)
                self.relay.unpublish(held)
        if self.relay.port_holder(self, message.local_port) is not None:
            refuse(protocol.CODE_PORT_FORWARDED, f"Port {message.local_port} is already forwarded")
            return
        tunnel = self.relay.new_tunnel(self, message, claimed[0], allow=allow)
        if message.tcp:
            try:
                await self.relay.open_tcp_port(tunnel, claimed[1])
            except OSError as exc:
                self.relay.unpublish(tunnel)
                code = protocol.CODE_CLAIM if claimed[1] else protocol.CODE_TCP_EXHAUSTED
                refuse(code, str(exc))
                return
        if self.closed:
            self.relay.unpublish(tunnel)
            return
        self.tunnels[tunnel.id] = tunnel
        self.channel.send(
            protocol.Opened(
                id=tunnel.id,
                host=tunnel.host,
                port=self.relay.public_port,
                tcp_host=self.relay.tcp_host if tunnel.tcp_port is not None else None,
                tcp_port=tunnel.tcp_port,
                claim=self.relay.claim_for(tunnel),
            )
        )

    # -- data connections ---------------------------------------------------

    def add_data_connection(self, channel: Channel) -> None:
        """A data connection proved it belongs here: give it to a visitor or pool it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(channel)
                return
        self._pool.append(channel)
        channel.stream.set_receiver(self._pooled_receiver)

    def drop_pooled(self, stream: Stream) -> None:
        for channel in self._pool:
            if channel.stream is stream:
                self._pool.remove(channel)
                return

    async def take_data_connection(self, wait_seconds: float) -> Channel | None:
        """An idle data connection for a new visitor; asks the agent for a replacement."""
        if self.closed:
            return None
        self._send_quietly(protocol.Dial(count=1))
        while self._pool:
            channel = self._pool.popleft()
            if not channel.stream.closed:
                return channel
        waiter: asyncio.Future[Channel] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await asyncio.wait_for(waiter, wait_seconds)
        except TimeoutError:
            return None

    def leave(self, reason: str) -> None:
        """End the session for a draining relay: the agent is told to reconnect,
        and the visitors in flight keep their connections."""
        self._leaving = True
        self._send_quietly(protocol.Error(code=protocol.CODE_SHUTTING_DOWN, message=reason))
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for tunnel in list(self.tunnels.values()):
            self.relay.unpublish(tunnel, keep_connections=self._leaving)
        self.tunnels.clear()
        while self._pool:
            self._pool.popleft().close()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.cancel()
        self.channel.close()
        self.relay.sessions.pop(self.id, None)
        log.info("session %s (%s) ended", self.id, self.claims.subject)
