"""The agent's session with one relay: control connection, data-connection pool, tunnels.

"What happens when a visitor arrives", seen from the workload, is
:meth:`AgentSession._serve_data_connection`: a pooled data connection is
bound to one of our tunnels and joined to a fresh connection to that
tunnel's local port, and to no other address.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from burrow._version import __version__
from burrow.agent import pick
from burrow.agent.errors import from_wire
from burrow.exception import (
    ConnectionError,
    Error,
    LocalProtocolError,
    RelayError,
    RemoteProtocolError,
)
from burrow.net import tls
from burrow.net.channel import Channel, serve_control
from burrow.net.splice import Splice, join
from burrow.net.stream import Stream, TlsStream
from burrow.net.tasks import TaskSet
from burrow.tunnel import Tunnel
from burrow.wire import names, protocol
from burrow.wire.text import loggable

log = logging.getLogger("burrow.agent")

# Attempts at reaching the relay before forward() gives up, and the first
# pause between them (doubled each time): rides out a relay restart of a
# second or two without hiding a relay that is really down.
CONNECT_ATTEMPTS: Final = 4
CONNECT_BACKOFF: Final = 0.25

# One TCP connect plus TLS handshake to the relay.
CONNECT_TIMEOUT: Final = 10.0

# The relay answers hello, open and close in one round trip; this only
# guards against a relay that has stopped answering.
REPLY_TIMEOUT: Final = 30.0

# Unpublishing waits no longer than this for the relay's answer: the close
# is on the wire by then, and a relay that takes longer is silent (stopped,
# or cut off). Ctrl-C must end a program within a second whatever the relay
# is doing; the relay drops the tunnel at the latest with the session.
CLOSE_TIMEOUT: Final = 0.5

# After a lost session the agent reconnects, waiting first about this long,
# then twice as long each time up to the cap: a restarted relay is found
# within about a second of being back. Jitter (±this fraction) keeps a
# fleet of agents from knocking all at once.
RECONNECT_FIRST_DELAY: Final = 0.1
RECONNECT_MAX_DELAY: Final = 1.0
RECONNECT_JITTER: Final = 0.25
# A relay still down after this many seconds is probably down for a while:
# from then on, try only this often, to spare it a crowd when it comes back.
RECONNECT_PATIENCE: Final = 60.0
RECONNECT_SLOW_DELAY: Final = 10.0
# With other relays to go to (BURROW_RELAY lists several), a relay that takes
# longer than this to come back is left for the next best: a restart or a
# deploy takes seconds; longer after the relay said it was draining, which
# is a planned restart on its way. Tunnels get new names on the new relay.
FAILOVER_SECONDS: Final = 30.0
FAILOVER_AFTER_DRAIN_SECONDS: Final = 90.0
# Relays that refuse a hello because they are full or draining send the agent
# to the next candidate at once.
_GO_ELSEWHERE: Final = frozenset({protocol.CODE_FULL, protocol.CODE_SHUTTING_DOWN})
# Its own generator: the jitter needs no secrecy, and the program's global
# random state is the program's.
_jitter = random.Random()

# The addresses a tunnel's local port is tried at, in order; both are this
# machine, so a bind frame can never lead anywhere else.
LOCAL_HOSTS: Final = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class AgentConfig:
    """Where the relay is and how to prove who we are."""

    relay: str
    """``host:port`` of the relay's public TLS port, or several separated by commas: the
    agent then picks one (:mod:`burrow.agent.pick`) and moves when it is gone."""

    token: str
    """Signed agent token."""

    ca: Path | None = None
    """The CA to trust for the relay instead of the system's (a private or dev CA)."""

    plain_data: bool = False
    """Use the relay's plaintext data port when it offers one (trusted networks only)."""

    workload: str | None = None
    """The workload this process belongs to (``burrow run``), if any."""

    failover: float | None = None
    """Seconds a lost relay has to come back before the agent moves to another
    (``BURROW_FAILOVER_SECONDS``; default ``FAILOVER_SECONDS``)."""

    @property
    def relays(self) -> tuple[str, ...]:
        """The relays to choose from, in the order given."""
        return pick.parse_relays(self.relay)


@dataclass(eq=False)
class AgentTunnel:
    """One of our published tunnels."""

    id: int
    local_port: int
    tunnel: Tunnel
    tcp: bool = False
    h2: bool = False
    allow: str | None = None
    claim: str | None = None
    """The relay's proof that this tunnel's names are ours, to get them back after a loss."""
    tcp_port: int | None = None
    """Its raw TCP port now: ``tunnel.unencrypted_port``, unless a reconnect could not
    take that back."""
    splices: set[Splice] = field(default_factory=set)
    on_move: list[Callable[[Tunnel, Tunnel], None]] = field(default_factory=list)
    """Told ``(old, new)`` when the tunnel moves to another relay (with new names)."""

    def reopening(self, *, claim: bool) -> protocol.Open:
        """The ``open`` that publishes this tunnel again: under its names (``claim``), or
        under new ones on another relay."""
        return protocol.Open(
            id=self.id,
            local_port=self.local_port,
            tcp=self.tcp,
            h2=self.h2,
            allow=self.allow,
            claim=self.claim if claim else None,
        )


def _tunnel_of(reply: protocol.Opened, local_port: int) -> Tunnel:
    """The addresses an ``opened`` gives the tunnel of ``local_port``."""
    return Tunnel(
        host=reply.host,
        port=reply.port,
        unencrypted_host=reply.tcp_host,
        unencrypted_port=reply.tcp_port,
        local_port=local_port,
    )


class AgentSession:
    """A live session with a relay; create with :meth:`connect`."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.relay = config.relays[0]
        """The relay this session is with (one of ``config.relays``)."""
        self.host, self.port = names.parse_address(self.relay, 443)
        # Control and data connections share one context: one trust store to load.
        self._context = tls.shared_client_context(config.ca)
        self.tunnels: dict[int, AgentTunnel] = {}
        self._next_id = 1
        self._pending: dict[int, asyncio.Future[protocol.Message]] = {}
        self._channel: Channel | None = None
        self._welcome: protocol.Welcome | None = None
        self._tasks = TaskSet()
        self._reader: asyncio.Task[None] | None = None
        # Why the relay ended the session, when it is for good.
        self._fatal: Error | None = None
        # Told why, once, when the session ends for good (see on_end).
        self._on_end: list[Callable[[BaseException], None]] = []
        self.ended: BaseException | None = None
        """Why the session ended for good; None while it lives (or reconnects)."""
        # Set while a control connection is up; new requests wait for it while
        # the session reconnects.
        self._connected = asyncio.Event()
        self.reconnects = 0
        self.moves = 0
        self._drain_announced = False
        # Data connections to open once the session has a tunnel (see _handshake).
        self._pool_to_fill = 0
        # The TLS session data connections resume (the control connection's, or the
        # last full handshake's): else a burst of visitors costs a full one each.
        self._data_tls: ssl.SSLSession | None = None
        self.closed = False

    @classmethod
    async def connect(cls, config: AgentConfig) -> AgentSession:
        """Open a session, retrying a few times; raises AuthError, RelayError or ConnectionError."""
        session = cls(config)
        delay = CONNECT_BACKOFF
        candidates = pick.candidates(config.relays) if len(config.relays) > 1 else [session.relay]
        for attempt in range(1, CONNECT_ATTEMPTS + 1):
            try:
                if len(candidates) > 1:
                    await session._handshake_best(candidates)
                else:
                    await session._handshake()
                return session
            except Error as exc:
                if exc.retryable and attempt < CONNECT_ATTEMPTS:
                    log.info("relay %s: %s; retrying in %.2fs", config.relay, loggable(exc), delay)
                    await asyncio.sleep(delay)
                    delay *= 2
                    continue
                if isinstance(exc, ConnectionError):
                    raise ConnectionError(
                        f"could not reach the burrow relay at {session.relay} after "
                        f"{CONNECT_ATTEMPTS} attempts: {exc}",
                        retryable=exc.retryable,
                    ) from exc
                raise
        raise AssertionError("unreachable")

    async def _dial(
        self,
        alpn: str,
        server_name: str | None = None,
        relay: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> TlsStream:
        """One TLS connection to the relay's public port (``relay``'s, if given); SNI is
        the relay's name by default; ``session`` is a TLS session to resume."""
        relay = relay or self.relay
        host, port = names.parse_address(relay, 443)
        loop = asyncio.get_running_loop()
        handshake: asyncio.Future[None] = loop.create_future()

        def done(stream: TlsStream, exc: BaseException | None) -> None:
            if handshake.done():
                return
            if exc is None:
                handshake.set_result(None)
            else:
                handshake.set_exception(exc)

        def factory() -> TlsStream:
            with tls.offering(self._context, [alpn]) as context:
                return TlsStream(
                    context,
                    server_side=False,
                    server_hostname=server_name or host,
                    on_handshake=done,
                    handshake_timeout=CONNECT_TIMEOUT,
                    session=session,
                )

        try:
            stream = await self._connect(factory, host, port)
            await handshake
        except ssl.SSLCertVerificationError as exc:
            raise ConnectionError(
                f"the relay at {relay} has a certificate we do not trust "
                f"({exc.verify_message}); set BURROW_CA to its CA certificate",
                retryable=False,
            ) from exc
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise ConnectionError(f"{type(exc).__name__}: {exc}") from exc
        return stream

    async def _connect(self, factory: Callable[[], TlsStream], host: str, port: int) -> TlsStream:
        """TCP to the relay; a ``*.localhost`` relay is tried on 127.0.0.1, then ::1."""
        loop = asyncio.get_running_loop()
        hosts = LOCAL_HOSTS if names.is_loopback_name(host) else (host,)
        for address in hosts[:-1]:
            try:
                _, stream = await asyncio.wait_for(
                    loop.create_connection(factory, address, port), CONNECT_TIMEOUT
                )
                return stream
            except ConnectionRefusedError:
                continue
        _, stream = await asyncio.wait_for(
            loop.create_connection(factory, hosts[-1], port), CONNECT_TIMEOUT
        )
        return stream

    async def _race(self, candidates: list[str], memory: pick.Memory) -> pick.Winner:
        """The race of :func:`burrow.agent.pick.race` over control connections; what it
        learns of the relays is kept in the agent's state directory."""
        memories = pick.memories()
        return await pick.race(
            candidates,
            lambda relay: self._dial(protocol.ALPN_CONTROL, relay=relay),
            memory,
            keep=lambda learnt: memories.save(self.config.relays, learnt),
        )

    async def _handshake_best(self, candidates: list[str]) -> None:
        """Pick a relay of ``candidates`` by racing their handshakes, and say hello to it.

        One that is full or draining is dropped from ``candidates`` and the next
        race starts at once; the error of the last is raised when none is left.
        """
        memory = pick.memories().load(self.config.relays)
        while True:
            winner = await self._race(candidates, memory)
            try:
                await self._handshake(stream=winner.stream, relay=winner.relay)
                return
            except RelayError as exc:
                if exc.code not in _GO_ELSEWHERE or len(candidates) == 1:
                    raise
                log.warning("relay %s: %s; trying the next", winner.relay, loggable(exc))
                candidates.remove(winner.relay)
                memory.home = None

    async def _handshake(
        self,
        server_name: str | None = None,
        *,
        stream: TlsStream | None = None,
        relay: str | None = None,
    ) -> None:
        """Say hello on a new control connection (or on ``stream``, made to ``relay``);
        on a welcome, this session is with that relay from now on."""
        relay = relay or self.relay
        if stream is None:
            stream = await self._dial(protocol.ALPN_CONTROL, server_name, relay)
        channel = Channel(stream, protocol.Connection(protocol.Kind.CONTROL, protocol.Role.AGENT))
        channel.send(
            protocol.Hello(
                version=protocol.PROTOCOL_VERSION,
                token=self.config.token,
                agent=f"burrow/{__version__}",
                workload=self.config.workload,
                fleet_serial=self._fleet_serial(),
            )
        )
        try:
            reply = await asyncio.wait_for(channel.receive(), REPLY_TIMEOUT)
        except (TimeoutError, RemoteProtocolError) as exc:
            channel.close()
            raise ConnectionError(f"the relay did not welcome us: {exc}") from exc
        if isinstance(reply, protocol.Error):
            channel.close()
            raise from_wire(reply, relay, "hello")
        if not isinstance(reply, protocol.Welcome):
            channel.close()
            raise ConnectionError("the relay closed the connection before welcoming us")
        self.relay = relay
        self.host, self.port = names.parse_address(relay, 443)
        self._drain_announced = False
        if reply.fleet is not None and len(self.config.relays) > 1:
            pick.keep_fleet(self.config.relays, reply.fleet)
        self._channel = channel
        self._welcome = reply
        # Its tickets came before the welcome: data connections resume this TLS
        # session, with this relay (and not one it was before a move).
        self._data_tls = _resumable(stream)
        self._connected.set()
        self._reader = asyncio.get_running_loop().create_task(
            self._read_control(channel, reply.heartbeat)
        )
        # The pool is filled once the session has a tunnel: before that no visitor
        # can come, and its TLS handshakes would only hold up the first `opened`.
        self._pool_to_fill = reply.pool
        if self.tunnels:
            self._fill_pool()
        log.info("session %s with relay %s", loggable(reply.session), self.relay)

    def _fill_pool(self) -> None:
        for _ in range(self._pool_to_fill):
            self._tasks.spawn(self._serve_data_connection())
        self._pool_to_fill = 0

    @property
    def session_id(self) -> str | None:
        """The relay's id of the current session (it changes when the agent reconnects)."""
        return self._welcome.session if self._welcome is not None else None

    # -- control connection -----------------------------------------------

    async def _read_control(self, channel: Channel, interval: float) -> None:
        reason: BaseException = ConnectionError(f"the relay at {self.relay} closed the session")
        try:
            await serve_control(channel, interval, self._handle)
        except (RemoteProtocolError, ConnectionError) as exc:
            reason = ConnectionError(f"session with {self.relay} lost: {exc}")
        finally:
            if self.closed or self._fatal is not None or self._channel is not channel:
                self._end(self._fatal or reason)
            else:
                self._lost(reason)

    # -- reconnecting: the code inside forward() never notices -----------------

    def _lost(self, reason: BaseException) -> None:
        """The control connection is gone: keep the tunnels and get a new session."""
        log.warning("%s; reconnecting", loggable(reason))
        self._channel = None
        self._connected.clear()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(reason)
        self._pending.clear()
        self._tasks.spawn(self._reconnect())

    async def _reconnect(self) -> None:
        assert self._welcome is not None
        # The old session's name sends us to the relay worker that holds our labels.
        resume = f"{self._welcome.session}.{self._welcome.domain}"
        delay, started = RECONNECT_FIRST_DELAY, time.monotonic()
        elsewhere = len(self.config.relays) > 1
        while not self.closed:
            jitter = _jitter.uniform(1 - RECONNECT_JITTER, 1 + RECONNECT_JITTER)
            await asyncio.sleep(delay * jitter)
            if elsewhere and time.monotonic() - started >= self._failover_after():
                if await self._move(started):
                    return
                delay = min(delay * 2, RECONNECT_MAX_DELAY)
                continue
            try:
                if elsewhere:
                    # A silent relay must not hold the move back for a connect timeout.
                    left = self._failover_after() - (time.monotonic() - started)
                    await asyncio.wait_for(self._handshake(resume), max(left, 0.1))
                else:
                    await self._handshake(resume)
            except TimeoutError:
                continue  # the failover time is up: the next turn moves
            except Error as exc:
                code = exc.code if isinstance(exc, RelayError) else None
                if elsewhere and code in _GO_ELSEWHERE and await self._move(started):
                    return
                # At its token's session limit the relay may still count our lost
                # session (until its heartbeat runs out): that passes, so try again.
                limited = code == protocol.CODE_LIMIT
                if not exc.retryable and not limited:
                    log.error("relay %s: %s; giving up the session", self.relay, loggable(exc))
                    self._end(exc)
                    return
                cap = RECONNECT_MAX_DELAY
                if time.monotonic() - started > RECONNECT_PATIENCE:
                    cap = RECONNECT_SLOW_DELAY
                delay = min(delay * 2, cap)
                log.info("relay %s: %s; trying again in %.1fs", self.relay, loggable(exc), delay)
                continue
            self.reconnects += 1
            await self._reopen_tunnels()
            return

    def _fleet_serial(self) -> int | None:
        """The serial of the fleet document kept, for ``hello``: a relay with a newer one
        gives it in ``welcome``. With one relay the agent keeps none (and says none)."""
        if len(self.config.relays) == 1:
            return None
        kept = pick.kept_fleet(self.config.relays)
        return kept.serial if kept is not None else 0

    def _failover_after(self) -> float:
        if self._drain_announced:
            return FAILOVER_AFTER_DRAIN_SECONDS
        return self.config.failover if self.config.failover is not None else FAILOVER_SECONDS

    async def _move(self, lost_since: float) -> bool:
        """Take the session to the best other relay and open every tunnel there, under
        new names (a name belongs to its relay). False if no other relay took us."""
        gone = self.relay
        others = [relay for relay in pick.candidates(self.config.relays) if relay != gone]
        memory = pick.memories().load(self.config.relays)
        memory.home = None  # the home is gone: the fastest other wins
        while True:
            try:
                winner = await self._race(others, memory)
            except Error as exc:
                log.info("no other relay to move to: %s", loggable(exc))
                return False
            try:
                await self._handshake(stream=winner.stream, relay=winner.relay)
                break
            except RelayError as exc:
                if exc.code not in _GO_ELSEWHERE or len(others) == 1:
                    log.info("relay %s did not take the session: %s", winner.relay, exc)
                    return False
                others.remove(winner.relay)  # full or draining: the next, at once
            except Error as exc:
                log.info("relay %s did not take the session: %s", winner.relay, exc)
                return False
        self.moves += 1
        log.warning(
            "relay %s unreachable for %.0fs: the session moved to %s, and its %d tunnels "
            "get new names there",
            gone,
            time.monotonic() - lost_since,
            self.relay,
            len(self.tunnels),
        )
        await self._reopen_moved()
        return True

    async def _reopen_moved(self) -> None:
        """Publish every tunnel on the relay the session moved to: new names, told to
        each tunnel's ``on_move`` callbacks."""
        for agent_tunnel in list(self.tunnels.values()):
            old = agent_tunnel.tunnel
            try:
                reply = await self._request(agent_tunnel.id, agent_tunnel.reopening(claim=False))
            except ConnectionError:
                return  # lost again: the next reconnect (or move) tries again
            if not isinstance(reply, protocol.Opened):
                why = reply.message if isinstance(reply, protocol.Error) else "no answer"
                log.error("tunnel %s could not move to %s: %s", old.url, self.relay, loggable(why))
                self.tunnels.pop(agent_tunnel.id, None)
                continue
            new = _tunnel_of(reply, agent_tunnel.local_port)
            agent_tunnel.tunnel, agent_tunnel.claim, agent_tunnel.tcp_port = (
                new,
                reply.claim,
                reply.tcp_port,
            )
            log.warning("tunnel moved: %s is now %s", old.url, new.url)
            for callback in agent_tunnel.on_move:
                try:
                    callback(old, new)
                except Exception:
                    log.exception("a callback for a tunnel's move failed")
        self._fill_pool()

    async def _reopen_tunnels(self) -> None:
        """Publish every tunnel again under its claimed names."""
        for agent_tunnel in list(self.tunnels.values()):
            tunnel = agent_tunnel.tunnel
            try:
                reply = await self._request(agent_tunnel.id, agent_tunnel.reopening(claim=True))
            except ConnectionError:
                return  # this session was lost too: the next reconnect tries again
            if isinstance(reply, protocol.Opened) and reply.host == tunnel.host:
                agent_tunnel.claim = reply.claim
                if reply.tcp_port != agent_tunnel.tcp_port:
                    # The relay keeps a lost tunnel's port only for a while: the
                    # name is back, the port is another one or none.
                    log.warning(
                        "tunnel %s is back, but not its TCP port %s: %s",
                        tunnel.url,
                        agent_tunnel.tcp_port,
                        f"now {loggable(reply.tcp_host)}:{reply.tcp_port}"
                        if reply.tcp_port is not None
                        else "it has none now",
                    )
                    agent_tunnel.tcp_port = reply.tcp_port
                continue
            why = reply.message if isinstance(reply, protocol.Error) else "other names"
            log.error("tunnel %s could not be published again: %s", tunnel.url, loggable(why))
            self.tunnels.pop(agent_tunnel.id, None)
            for splice in list(agent_tunnel.splices):
                splice.close()
            if isinstance(reply, protocol.Opened):
                with contextlib.suppress(ConnectionError):
                    await self._request(agent_tunnel.id, protocol.Close(id=agent_tunnel.id))
        log.info("session with %s resumed: %d tunnels", self.relay, len(self.tunnels))

    async def _handle(self, message: protocol.Message) -> None:
        """One message on the control connection (pings are answered before this)."""
        match message:
            case protocol.Opened(id=tunnel_id) | protocol.Closed(id=tunnel_id):
                self._resolve(tunnel_id, message)
            case protocol.Error(id=None):
                log.warning(
                    "relay ended the session: %s (%s)",
                    loggable(message.message),
                    loggable(message.code),
                )
                error = from_wire(message, self.relay, "session")
                if not error.retryable:  # else the session is lost and comes back
                    self._fatal = error
                elif message.code == protocol.CODE_SHUTTING_DOWN:
                    self._drain_announced = True  # a restart: give it longer to come back
                if self._channel is not None:
                    self._channel.close()
            case protocol.Error(id=int(tunnel_id)):
                self._resolve(tunnel_id, message)
            case protocol.Dial(count=count):
                log.debug("relay asks for %d data connections", count)
                for _ in range(min(count, 64)):
                    self._tasks.spawn(self._serve_data_connection())
            case _:
                pass

    def _resolve(self, tunnel_id: int, message: protocol.Message) -> None:
        future = self._pending.pop(tunnel_id, None)
        if future is not None and not future.done():
            future.set_result(message)

    def _send(self, message: protocol.Message) -> None:
        if self._channel is None or self.closed:
            raise ConnectionError(f"the session with {self.relay} is closed")
        try:
            self._channel.send(message)
        except LocalProtocolError as exc:  # pragma: no cover - a bug in burrow
            raise ConnectionError(str(exc)) from exc

    async def _request(
        self, tunnel_id: int, message: protocol.Message, reply_timeout: float = REPLY_TIMEOUT
    ) -> protocol.Message:
        if self._channel is None and not self.closed:
            try:
                await asyncio.wait_for(self._connected.wait(), REPLY_TIMEOUT)
            except TimeoutError as exc:
                raise ConnectionError(
                    f"the relay at {self.relay} is unreachable; still trying"
                ) from exc
        future: asyncio.Future[protocol.Message] = asyncio.get_running_loop().create_future()
        self._pending[tunnel_id] = future
        self._send(message)
        try:
            return await asyncio.wait_for(future, reply_timeout)
        except TimeoutError as exc:
            raise ConnectionError(f"the relay at {self.relay} did not answer") from exc
        finally:
            self._pending.pop(tunnel_id, None)

    # -- tunnels ------------------------------------------------------------

    async def open_tunnel(
        self, port: int, *, tcp: bool, h2: bool, allow: str | None = None
    ) -> Tunnel:
        """Publish ``port``: one round trip to the relay."""
        tunnel_id = self._next_id
        self._next_id += 1
        reply = await self._request(
            tunnel_id, protocol.Open(id=tunnel_id, local_port=port, tcp=tcp, h2=h2, allow=allow)
        )
        if isinstance(reply, protocol.Error):
            raise from_wire(reply, self.relay, "open")
        assert isinstance(reply, protocol.Opened)
        tunnel = _tunnel_of(reply, port)
        self.tunnels[tunnel_id] = AgentTunnel(
            id=tunnel_id,
            local_port=port,
            tunnel=tunnel,
            tcp=tcp,
            h2=h2,
            allow=allow,
            claim=reply.claim,
            tcp_port=reply.tcp_port,
        )
        self._fill_pool()
        return tunnel

    def tunnel_id(self, tunnel: Tunnel) -> int | None:
        """The id of the tunnel ``open_tunnel`` gave (or that it became after a move)."""
        for agent_tunnel in self.tunnels.values():
            if agent_tunnel.tunnel is tunnel:
                return agent_tunnel.id
        return None

    async def close_tunnel(self, tunnel: Tunnel) -> None:
        """Unpublish: when this returns, the relay routes the name nowhere.

        Unless the relay cannot say so at once: while the session is lost the
        tunnel is only forgotten (the lost session's tunnels end with it, and
        reconnecting does not publish this one again), and a silent relay is
        waited for ``CLOSE_TIMEOUT`` seconds. Neither waits for the relay.
        """
        for agent_tunnel in list(self.tunnels.values()):
            if agent_tunnel.tunnel is tunnel:
                break
        else:
            return
        del self.tunnels[agent_tunnel.id]
        for splice in list(agent_tunnel.splices):
            splice.close()
        if self.closed or self._channel is None:
            return
        with contextlib.suppress(ConnectionError):
            await self._request(
                agent_tunnel.id, protocol.Close(id=agent_tunnel.id), reply_timeout=CLOSE_TIMEOUT
            )

    # -- data connections -----------------------------------------------------

    async def _serve_data_connection(self) -> None:
        """Wait in the pool for a visitor, then join it to the tunnel's local port."""
        if self.closed or self._welcome is None:
            return
        try:
            stream = await self._dial_data()
        except ConnectionError as exc:
            log.warning("data connection to %s failed: %s", self.relay, loggable(exc))
            return
        if self.closed or self._fatal is not None:
            stream.close()  # the session ended while this one was dialled: no attach
            return
        log.debug("data connection to %s up", self.relay)
        channel = Channel(stream, protocol.Connection(protocol.Kind.DATA, protocol.Role.AGENT))
        channel.send(protocol.Attach(session=self._welcome.session, key=self._welcome.key))
        try:
            bind = await channel.receive()
        except asyncio.CancelledError:
            stream.abort()
            raise
        except (RemoteProtocolError, ConnectionError) as exc:
            log.info("data connection ended before a visitor: %s", loggable(exc))
            stream.abort()
            return
        if isinstance(stream, TlsStream) and not stream.ssl_object.session_reused:
            # A full handshake: the relay no longer takes the ticket we have. This
            # connection's came before the bind; the next data connections resume it.
            self._data_tls = _resumable(stream) or self._data_tls
        if not isinstance(bind, protocol.Bind):
            if isinstance(bind, protocol.Error):
                log.warning("relay refused a data connection: %s", loggable(bind.message))
            stream.close()
            return
        agent_tunnel = self.tunnels.get(bind.id)
        if agent_tunnel is None:
            stream.close()
            return
        local = await self._connect_local(agent_tunnel.local_port)
        if local is None or agent_tunnel.id not in self.tunnels:
            log.info(
                "visitor %s: nothing listens on local port %d",
                loggable(bind.visitor),
                agent_tunnel.local_port,
            )
            if local is not None:
                local.abort()
            stream.close()
            return
        splice = join(stream, local, on_done=agent_tunnel.splices.discard)
        agent_tunnel.splices.add(splice)
        splice.start(a_first=channel.trailing)

    async def _dial_data(self) -> Stream:
        """A data connection: TLS, or plain TCP where both sides agreed to it."""
        assert self._welcome is not None
        plain_port = self._welcome.plain_port
        if not (self.config.plain_data and plain_port):
            return await self._dial(
                protocol.ALPN_DATA, self._welcome.data_name, session=self._data_tls
            )
        host = names.resolve_host(self.host)
        try:
            _, stream = await asyncio.wait_for(
                asyncio.get_running_loop().create_connection(Stream, host, plain_port),
                CONNECT_TIMEOUT,
            )
        except (OSError, TimeoutError) as exc:
            raise ConnectionError(f"plaintext data port {host}:{plain_port}: {exc}") from exc
        return stream

    async def _connect_local(self, port: int) -> Stream | None:
        loop = asyncio.get_running_loop()
        for host in LOCAL_HOSTS:
            try:
                _, local = await loop.create_connection(Stream, host, port)
            except OSError:
                continue
            local.pause_reading()
            return local
        return None

    # -- ending ---------------------------------------------------------------

    def on_end(self, callback: Callable[[BaseException], None]) -> None:
        """Call ``callback(reason)`` on the agent's loop when the session ends for good:
        closed, or ended by the relay with an error it does not retry."""
        self._on_end.append(callback)

    def _end(self, reason: BaseException) -> None:
        if self.closed:
            return
        self.closed = True
        self.ended = reason
        for callback in self._on_end:
            try:
                callback(reason)
            except Exception:
                log.exception("a callback for the session's end failed")
        self._connected.set()  # nothing to wait for any more: requests fail at once
        for future in self._pending.values():
            if not future.done():
                future.set_exception(reason)
        self._pending.clear()
        for agent_tunnel in self.tunnels.values():
            for splice in list(agent_tunnel.splices):
                splice.close()
        self.tunnels.clear()
        if self._channel is not None:
            self._channel.close()
        self._tasks.cancel()

    async def close(self) -> None:
        self._end(ConnectionError("the session was closed"))
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


def _resumable(stream: TlsStream) -> ssl.SSLSession | None:
    """``stream``'s TLS session, if the relay gave a ticket to resume it with. Reading
    it copies it, the relay's certificate and all (some 0.1 ms): read it seldom."""
    tls_session = stream.ssl_object.session
    return tls_session if tls_session is not None and tls_session.has_ticket else None


async def pin_relay(config: AgentConfig) -> AgentConfig:
    """``config`` with its relay picked once, for a workload whose processes must share
    one (``burrow run``, ``Sandbox``): the race of :meth:`AgentSession._handshake_best`,
    without a session. One relay: ``config`` as it is."""
    relays = config.relays
    if len(relays) == 1:
        return config
    dialer = AgentSession(config)
    winner = await dialer._race(list(relays), pick.memories().load(relays))
    winner.stream.close()
    log.info("the workload's relay: %s", winner.relay)
    return dataclasses.replace(config, relay=winner.relay)
