"""One agent session at the relay: its control connection, its requests and its
data-connection pool. "An agent opens a tunnel" is :meth:`RelaySession._open`.

The session decides nothing alone: admission says whether a request may go
ahead and the registry publishes and unpublishes its tunnels.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Final, Protocol

from burrow.exception import ConnectionError, LocalProtocolError, RemoteProtocolError
from burrow.net.channel import Channel, serve_control
from burrow.net.stream import BaseReceiver, Chunk, Stream
from burrow.relay.admission import Admission
from burrow.relay.claims import ClaimSigner
from burrow.relay.config import RelayConfig
from burrow.relay.metrics import RelayMetrics
from burrow.relay.pool import REFILL_DELAY, Reserve, dial_counts
from burrow.relay.registry import Registry
from burrow.relay.registry import RelayTunnel as RelayTunnel
from burrow.tokens import TokenGrant
from burrow.wire import protocol
from burrow.wire.text import loggable

log = logging.getLogger("burrow.relay")

# A data connection asked for with `dial` arrives within the agent's connect
# timeout (10 s) plus the relay's first-frame timeout (10 s), or never: the
# agent could not connect. Past this it counts as lost and is asked for again.
DIAL_EXPIRY_SECONDS: Final = 20.0

# Why a session ended, from the error the relay sent to end it (metrics.SESSION_END_REASONS).
_END_REASONS: Final = {
    protocol.CODE_AUTH: "revoked",
    protocol.CODE_TOKEN_EXPIRED: "expired",
    protocol.CODE_ENDED_BY_OPERATOR: "ended-by-operator",
    protocol.CODE_SHUTTING_DOWN: "draining",
    protocol.CODE_PROTOCOL: "protocol",
}


class RelayServices(Protocol):
    """What a session uses of the relay that runs it (the server's ``Relay``)."""

    @property
    def config(self) -> RelayConfig: ...

    @property
    def registry(self) -> Registry: ...

    @property
    def admission(self) -> Admission: ...

    @property
    def metrics(self) -> RelayMetrics: ...

    @property
    def claims(self) -> ClaimSigner: ...

    @property
    def public_port(self) -> int:
        """The TLS port visitors use, for the addresses in ``opened``."""

    @property
    def tcp_host(self) -> str:
        """The name visitors use for raw TCP tunnels."""

    async def open_tcp_port(self, tunnel: RelayTunnel, port: int | None = None) -> None:
        """Listen for a raw TCP tunnel on ``port``, or on any free one; OSError if none."""


class _Pooled(BaseReceiver):
    """Receiver of an idle data connection: it may only close while it waits."""

    def __init__(self, session: RelaySession) -> None:
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


class RelaySession:
    """Everything the relay holds for one authenticated agent."""

    def __init__(
        self,
        relay: RelayServices,
        channel: Channel,
        grant: TokenGrant,
        workload: str | None = None,
        *,
        peer: str = "",
        agent: str = "",
    ) -> None:
        """``peer`` (the agent's address) and ``agent`` (its ``hello.agent``) are for
        operators (the admin API)."""
        self.relay = relay
        self.channel = channel
        self.grant = grant
        # The `burrow run` workload the agent's process belongs to: its ports are its own.
        self.workload = workload
        self.id = relay.registry.new_name()
        self.key = secrets.token_urlsafe(32)
        # Idle data connections, oldest first, each with its idle timer.
        self._pool: dict[Channel, asyncio.TimerHandle] = {}
        # Visitors waiting for a data connection; None tells one the session ended.
        self._waiters: collections.deque[asyncio.Future[Channel | None]] = collections.deque()
        # When each data connection asked for and not yet come was asked for.
        self._dialed: collections.deque[float] = collections.deque()
        self._attached = 0  # data connections that ever came
        # How many idle ones to keep: the pool size, more after a burst of visitors.
        self._reserve = Reserve(relay.config.pool_size)
        self._refill_timer: asyncio.TimerHandle | None = None
        self._trim_timer: asyncio.TimerHandle | None = None
        self._filled = False  # the agent fills its pool once it has a tunnel
        self._pooled_receiver = _Pooled(self)
        self._leaving = False
        self.closed = False
        self.peer = peer
        self.agent = agent
        self.connected_since = time.time()
        self.carried = [0, 0]
        self._end_reason: str | None = None  # metrics.SESSION_END_REASONS; None: not yet

    def __repr__(self) -> str:
        return f"<RelaySession {self.id} {self.grant.subject}>"

    @property
    def tunnels(self) -> Mapping[int, RelayTunnel]:
        """The session's published tunnels by id (the registry keeps them)."""
        return self.relay.registry.tunnels_of(self)

    # -- control connection -----------------------------------------------

    async def run(self) -> None:
        """Serve the control connection until it ends; then free everything."""
        try:
            await serve_control(self.channel, self.relay.config.heartbeat, self._handle)
            self._ending("agent-closed")
        except protocol.HeartbeatTimeout as exc:
            log.info("session %s: heartbeat missed: %s", self.id, exc)
            self._ending("heartbeat")
        except RemoteProtocolError as exc:
            log.info("session %s: protocol error: %s", self.id, loggable(exc))
            self._ending("protocol")
            self._send_quietly(protocol.Error(code=protocol.CODE_PROTOCOL, message=str(exc)))
        except ConnectionError as exc:
            log.info("session %s: %s", self.id, loggable(exc))
            self._ending("connection-lost")
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
                self.relay.registry.unpublish(tunnel)
                self.channel.send(protocol.Closed(id=tunnel_id))
            case _:  # pragma: no cover - the protocol's state table forbids the rest
                raise RemoteProtocolError(f"unexpected {message.TYPE}")

    async def _open(self, message: protocol.Open) -> None:
        registry, admission = self.relay.registry, self.relay.admission
        admitted = admission.check_open(
            message, grant=self.grant, tunnels=self.tunnels, now=time.monotonic()
        )
        if isinstance(admitted, protocol.Error):
            self.relay.metrics.count_open_error(admitted.code)
            self.channel.send(admitted)
            if admitted.code == protocol.CODE_TOKEN_EXPIRED:
                log.warning(
                    "session %s for %s ended: %s",
                    self.id,
                    loggable(self.grant.subject),
                    admitted.message,
                )
                self.end(protocol.Error(code=admitted.code, message=admitted.message))
            return
        claim = admitted.claim
        if claim is not None:
            held = registry.routes.get(claim.label)
            if held is not None:
                # Only the same token can sign the claim: its old session (lost,
                # and not yet timed out) lets the name go to the new one.
                log.info("session %s takes %s back from %s", self.id, held.host, held.session.id)
                registry.unpublish(held)
        refusal = admission.check_port(message, registry.port_holder(self, message.local_port))
        if refusal is not None:
            self.relay.metrics.count_open_error(refusal.code)
            self.channel.send(refusal)
            return
        tunnel = registry.publish(
            self, message, claim.label if claim else None, allow=admitted.allow
        )
        if message.tcp:
            tcp_port = claim.tcp_port if claim else None
            try:
                await self.relay.open_tcp_port(tunnel, tcp_port)
            except OSError as exc:
                if claim is None:
                    registry.unpublish(tunnel)
                    self.relay.metrics.count_open_error(protocol.CODE_TCP_EXHAUSTED)
                    self.channel.send(
                        protocol.Error(
                            id=message.id, code=protocol.CODE_TCP_EXHAUSTED, message=str(exc)
                        )
                    )
                    return
                # Only the port cannot come back: the name does, with another port
                # or none, and `opened` says which.
                if tcp_port is not None and not tunnel.closed:
                    with contextlib.suppress(OSError):
                        await self.relay.open_tcp_port(tunnel)
                log.warning(
                    "session %s: %s is back without its TCP port %s (%s); TCP port now %s",
                    self.id,
                    tunnel.host,
                    tcp_port,
                    exc,
                    tunnel.tcp_port if tunnel.tcp_port is not None else "none",
                )
        if self.closed:
            registry.unpublish(tunnel)
            return
        if not self._filled:
            # With its first tunnel the agent opens its pool on its own: those are on their way.
            self._filled = True
            self._expect(max(0, self.relay.config.pool_size - self._attached), time.monotonic())
        self.relay.metrics.tunnel_opens[tunnel.kind] += 1
        self.channel.send(
            protocol.Opened(
                id=tunnel.id,
                host=tunnel.host,
                port=self.relay.public_port,
                tcp_host=self.relay.tcp_host if tunnel.tcp_port is not None else None,
                tcp_port=tunnel.tcp_port,
                claim=self.relay.claims.sign(tunnel.label, tunnel.tcp_port, self.grant.token_id),
            )
        )

    # -- data connections ---------------------------------------------------

    def add_data_connection(self, channel: Channel) -> None:
        """A data connection proved it belongs here: give it to a visitor or pool it.

        The pool holds at most its reserve plus the visitors waiting; a
        connection beyond that (asked for by a visitor who has gone since) is
        closed.
        """
        self._attached += 1
        if self._dialed:
            self._dialed.popleft()
        self._give(channel)

    def _give(self, channel: Channel) -> None:
        if self.closed:
            channel.close()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(channel)
                return
        if len(self._pool) >= self._reserve.wanted(time.monotonic()) + len(self._waiters):
            channel.close()
            return
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.relay.config.pool_idle_timeout, self._idle, channel)
        self._pool[channel] = timer
        channel.stream.set_receiver(self._pooled_receiver)

    def _idle(self, channel: Channel) -> None:
        if self._pool.pop(channel, None) is not None:
            log.debug("session %s: closing a data connection idle too long", self.id)
            channel.close()

    @property
    def pooled(self) -> int:
        """Idle data connections waiting in the pool."""
        return len(self._pool)

    def drop_pooled(self, stream: Stream) -> None:
        for channel in self._pool:
            if channel.stream is stream:
                self._pool.pop(channel).cancel()
                return

    def _take_pooled(self) -> Channel | None:
        while self._pool:
            channel = next(iter(self._pool))
            self._pool.pop(channel).cancel()
            if not channel.stream.closed:
                return channel
        return None

    async def take_data_connection(
        self, wait_seconds: float, wanted: Callable[[], bool] = lambda: True
    ) -> Channel | None:
        """A data connection for a visitor, or None (none came in time, the session
        ended, or ``wanted()`` says the visitor has gone meanwhile).

        Only a connection handed out is replaced (``dial``); one that finds its
        visitor gone goes back to the pool unreplaced, so visitors that leave
        at once cannot grow the pool.
        """
        if self.closed:
            return None
        channel = self._take_pooled()
        if channel is None:
            waiter: asyncio.Future[Channel | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            self._reserve.waited(time.monotonic(), len(self._waiters))
            self._refill()
            try:
                channel = await asyncio.wait_for(waiter, wait_seconds)
            except TimeoutError:
                return None
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if channel is None:
                return None
        if not wanted():
            self._give(channel)
            return None
        self._reserve.handed_out(time.monotonic())
        self._refill()
        if self._trim_timer is None and self._reserve.raised(time.monotonic()):
            self._trim_timer = asyncio.get_running_loop().call_later(
                self._reserve.half_life, self._trim
            )
        return channel

    def _expect(self, count: int, now: float) -> None:
        self._dialed.extend([now] * count)

    def _refill(self) -> None:
        """Ask the agent for what the pool lacks: its reserve, plus one per visitor
        waiting, less what is idle here and what is on its way.

        The pool's size and the visitors waiting are asked for at once; the rest
        of a reserve raised by a burst once no visitor waits (REFILL_DELAY): its
        handshakes would compete with the burst for the agent's CPU and the relay's.
        """
        if self.closed:
            return
        now = time.monotonic()
        while self._dialed and self._dialed[0] < now - DIAL_EXPIRY_SECONDS:
            self._dialed.popleft()
        self._ask(self._reserve.base + len(self._waiters), now)
        wanted = self._reserve.wanted(now) + len(self._waiters)
        if self._refill_timer is None and wanted > len(self._pool) + len(self._dialed):
            self._refill_timer = asyncio.get_running_loop().call_later(
                REFILL_DELAY, self._refill_reserve
            )

    def _refill_reserve(self) -> None:
        self._refill_timer = None
        if self.closed:
            return
        now = time.monotonic()
        if self._waiters:  # the burst is not over: they come first
            self._refill_timer = asyncio.get_running_loop().call_later(
                REFILL_DELAY, self._refill_reserve
            )
            return
        self._ask(self._reserve.wanted(now), now)

    def _ask(self, wanted: int, now: float) -> None:
        """``dial`` for what ``wanted`` lacks, less what is idle here and on its way."""
        missing = wanted - len(self._pool) - len(self._dialed)
        if missing > 0:
            self._expect(missing, now)
            for count in dial_counts(missing):
                self._send_quietly(protocol.Dial(count=count))

    def _trim(self) -> None:
        """Close the idle connections the reserve, decaying, no longer wants (oldest first)."""
        self._trim_timer = None
        now = time.monotonic()
        for _ in range(len(self._pool) - self._reserve.wanted(now)):
            channel = next(iter(self._pool))
            self._pool.pop(channel).cancel()
            channel.close()
        if self._reserve.raised(now) and not self.closed:
            self._trim_timer = asyncio.get_running_loop().call_later(
                self._reserve.half_life, self._trim
            )

    # -- the end ------------------------------------------------------------

    def end(self, error: protocol.Error) -> None:
        """Tell the agent why (if the connection still takes frames), then close."""
        self._ending(_END_REASONS.get(error.code, "protocol"))
        self._send_quietly(error)
        self.close()

    def leave(self, reason: str) -> None:
        """End the session for a draining relay: the agent is told to reconnect,
        and the visitors in flight keep their connections."""
        self._leaving = True
        self.end(protocol.Error(code=protocol.CODE_SHUTTING_DOWN, message=reason))

    def _ending(self, reason: str) -> None:
        if self._end_reason is None:
            self._end_reason = reason

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.relay.metrics.count_session_end(self._end_reason or "relay-closed")
        self.relay.registry.remove_session(self, keep_connections=self._leaving)
        for timer in (self._refill_timer, self._trim_timer):
            if timer is not None:
                timer.cancel()
        self._refill_timer = self._trim_timer = None
        while (channel := self._take_pooled()) is not None:
            channel.close()
        while self._waiters:  # their visitors are closed at once, not left hanging
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        self.channel.close()
        log.info("session %s (%s) ended", self.id, loggable(self.grant.subject))
