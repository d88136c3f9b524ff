"""The relay's tables: its sessions, the route table of tunnels, workload ports and quotas.

The registry is the only writer of them. A tunnel is published and
unpublished here and nowhere else, so the route table, a session's
tunnels, its workload's ports and its token's quota always agree.
No sockets: everything here can be driven from a test.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from burrow.net.channel import Channel
from burrow.net.splice import Splice
from burrow.relay.ports import Listener, TcpPorts
from burrow.relay.quota import TokenQuotas
from burrow.tokens import TokenGrant
from burrow.wire import allowlist, names, protocol

log = logging.getLogger("burrow.relay")


class SessionHandle(Protocol):
    """What the registry and the relay's server ask of a session (``RelaySession``)."""

    id: str
    key: str
    """The secret a data connection shows in ``attach``."""
    grant: TokenGrant
    workload: str | None
    """The ``burrow run`` workload the agent's process belongs to: its ports are its own."""
    closed: bool
    carried: list[int]
    """Bytes of the session's visitors' connections that have ended: [to the agent,
    to the visitors]."""
    peer: str
    """The agent's address, for operators."""
    agent: str
    """What the agent said it is in ``hello``."""
    connected_since: float
    """Wall-clock time of its ``hello``."""

    @property
    def pooled(self) -> int:
        """Idle data connections in its pool."""

    def add_data_connection(self, channel: Channel) -> None: ...

    async def take_data_connection(
        self, wait_seconds: float, wanted: Callable[[], bool] = ...
    ) -> Channel | None: ...

    def end(self, error: protocol.Error) -> None:
        """Send ``error`` to the agent and close."""

    def leave(self, reason: str) -> None:
        """Close for a draining relay: the agent reconnects, visitors in flight go on."""

    def close(self) -> None: ...


@dataclass(eq=False)
class RelayTunnel:
    """A published tunnel, as the relay routes it."""

    session: SessionHandle
    id: int
    label: str
    host: str
    h2: bool
    local_port: int
    tcp: bool = False
    """Published with a raw TCP port too (``tcp_port`` once it is bound)."""
    tcp_port: int | None = None
    tcp_servers: list[Listener] = field(default_factory=list)
    splices: set[Splice] = field(default_factory=set)
    waiting: int = 0
    """Visitors waiting for a data connection."""
    closed: bool = False
    allow: tuple[allowlist.Network, ...] | None = None
    """The networks visitors may come from; None lets everyone in, () no one."""
    opened_at: float = field(default_factory=time.time)
    carried: list[int] = field(default_factory=lambda: [0, 0])
    """Bytes of this tunnel's visitors' connections that have ended: [to the agent,
    to the visitors]; those still open are counted by their splices."""

    @property
    def kind(self) -> str:
        """``tcp``, ``h2`` or ``https``: what the tunnel was opened as."""
        return "tcp" if self.tcp else "h2" if self.h2 else "https"


class Registry:
    """Sessions and tunnels of one relay process, and the names it hands out.

    As one of ``worker_count`` worker processes (``worker_index``), it makes
    only names that hash to itself.
    """

    def __init__(
        self,
        domain: str,
        quotas: TokenQuotas,
        *,
        worker_index: int = 0,
        worker_count: int = 1,
        ports: TcpPorts | None = None,
    ) -> None:
        """``ports`` gets back the TCP port of each raw TCP tunnel unpublished."""
        self.domain = domain
        self.quotas = quotas
        self.ports = ports
        self.worker_index = worker_index
        self.worker_count = worker_count
        self._sessions: dict[str, SessionHandle] = {}
        self._routes: dict[str, RelayTunnel] = {}
        # session id -> tunnel id -> tunnel
        self._tunnels: dict[str, dict[int, RelayTunnel]] = {}
        # (token id, workload) -> local port -> the tunnel forwarding it: one
        # workload forwards a port once, whichever of its processes asks.
        self._workload_ports: dict[tuple[str, str], dict[int, RelayTunnel]] = {}

    # -- reading ------------------------------------------------------------

    @property
    def sessions(self) -> Mapping[str, SessionHandle]:
        """Live sessions by id (read-only)."""
        return MappingProxyType(self._sessions)

    @property
    def routes(self) -> Mapping[str, RelayTunnel]:
        """The route table: published tunnels by label (read-only)."""
        return MappingProxyType(self._routes)

    def tunnels_of(self, session: SessionHandle) -> Mapping[int, RelayTunnel]:
        """The session's published tunnels by id (read-only)."""
        return MappingProxyType(self._tunnels.get(session.id, {}))

    def port_holder(self, session: SessionHandle, port: int) -> RelayTunnel | None:
        """The live tunnel of the session's workload that already forwards ``port``."""
        if session.workload is None:
            return None
        ports = self._workload_ports.get((session.grant.token_id, session.workload), {})
        holder = ports.get(port)
        return holder if holder is not None and not holder.closed else None

    # -- names --------------------------------------------------------------

    def owns(self, name: str) -> bool:
        """Whether this process owns ``name`` (always, unless one of several workers)."""
        return self.worker_count == 1 or names.worker_of(name, self.worker_count) == (
            self.worker_index
        )

    def new_name(self) -> str:
        """A fresh label or session id that this process owns and no one holds."""
        while True:
            name = names.new_label_for(self.worker_index, self.worker_count)
            # 72 bits: a repeat never happens in practice, but is cheap to rule out.
            if name not in self._routes and name not in self._sessions:
                return name

    # -- sessions -----------------------------------------------------------

    def add_session(self, session: SessionHandle) -> None:
        self._sessions[session.id] = session

    def remove_session(self, session: SessionHandle, *, keep_connections: bool = False) -> None:
        """Unpublish the session's tunnels and forget it (see :meth:`unpublish`)."""
        for tunnel in list(self._tunnels.get(session.id, {}).values()):
            self.unpublish(tunnel, keep_connections=keep_connections)
        self._tunnels.pop(session.id, None)
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]

    # -- tunnels ------------------------------------------------------------

    def publish(
        self,
        session: SessionHandle,
        message: protocol.Open,
        label: str | None = None,
        *,
        allow: tuple[allowlist.Network, ...] | None = None,
    ) -> RelayTunnel:
        """Publish a tunnel under a fresh label, or under ``label`` that a claim proved.

        ``allow`` (the parsed ``message.allow``) limits who may visit; None is everyone.
        """
        label = label or self.new_name()
        self.quotas.add(session.grant.token_id)
        tunnel = RelayTunnel(
            session=session,
            id=message.id,
            label=label,
            host=f"{label}.{self.domain}",
            h2=message.h2,
            local_port=message.local_port,
            tcp=message.tcp,
            allow=allow,
        )
        self._routes[label] = tunnel
        self._tunnels.setdefault(session.id, {})[tunnel.id] = tunnel
        if session.workload is not None:
            key = (session.grant.token_id, session.workload)
            self._workload_ports.setdefault(key, {})[message.local_port] = tunnel
        log.info(
            "tunnel %s published for session %s (local port %d%s%s)",
            tunnel.host,
            session.id,
            message.local_port,
            ", tcp" if message.tcp else "",
            ", h2" if message.h2 else "",
        )
        return tunnel

    def unpublish(self, tunnel: RelayTunnel, *, keep_connections: bool = False) -> None:
        """Stop routing the tunnel: new visitors are refused at once.

        Its visitors in flight are closed too, unless ``keep_connections``
        (a draining relay lets them finish).
        """
        if tunnel.closed:
            return
        tunnel.closed = True
        session = tunnel.session
        self.quotas.remove(session.grant.token_id)
        if session.workload is not None:
            key = (session.grant.token_id, session.workload)
            ports = self._workload_ports.get(key, {})
            if ports.get(tunnel.local_port) is tunnel:
                del ports[tunnel.local_port]
                if not ports:
                    del self._workload_ports[key]
        if self._routes.get(tunnel.label) is tunnel:
            del self._routes[tunnel.label]
        held = self._tunnels.get(session.id, {})
        if held.get(tunnel.id) is tunnel:
            del held[tunnel.id]
            if not held:
                del self._tunnels[session.id]
        for server in tunnel.tcp_servers:
            server.close()
        if tunnel.tcp_port is not None and self.ports is not None:
            # Kept for this token a while: its agent may come back for it with its claim.
            # No more of them than the token may hold tunnels, however often it churns.
            limit = self.quotas.max_tunnels
            if session.grant.max_tunnels is not None:
                limit = min(limit, session.grant.max_tunnels)
            self.ports.release(tunnel.tcp_port, session.grant.token_id, keep=limit)
        if not keep_connections:
            for splice in list(tunnel.splices):
                splice.close()
        tunnel.splices.clear()
        log.info("tunnel %s closed", tunnel.host)
