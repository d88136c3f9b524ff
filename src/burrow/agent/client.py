"""``burrow.forward()`` and ``burrow.Client``: the agent inside the calling process.

The agent runs on an event loop in one background thread per process, with
one session per relay and token, shared by all the process's tunnels. A
tunnel lives exactly as long as its ``with`` block and its process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from burrow.agent import pick
from burrow.agent.session import AgentConfig, AgentSession, AgentTunnel
from burrow.env import (
    ENV_CA,
    ENV_FAILOVER_SECONDS,
    ENV_PLAIN_DATA,
    ENV_RELAY,
    ENV_TOKEN,
    ENV_WORKLOAD,
    running_dev_env,
)
from burrow.exception import ConnectionError, InvalidError
from burrow.net.limits import raise_open_file_limit
from burrow.net.loopthread import LoopThread
from burrow.tunnel import Tunnel
from burrow.wire import allowlist, names

T = TypeVar("T")


@dataclass(frozen=True)
class Client:
    """Explicit relay settings; any left as ``None`` come from the environment."""

    relay: str | Sequence[str] | None = None
    """``host:port`` of the relay (``BURROW_RELAY``), or several (a list, or one string
    separated by commas): the agent picks the nearest and moves if it goes away."""

    token: str | None = None
    """Agent token (``BURROW_TOKEN``)."""

    ca: str | Path | None = None
    """CA certificate file to trust for the relay (``BURROW_CA``), instead of the system's CAs."""

    plain_data: bool | None = None
    """Use the relay's plaintext data port if offered (``BURROW_PLAIN_DATA=1``);
    trusted networks only."""

    workload: str | None = None
    """The workload the tunnels belong to (``BURROW_WORKLOAD``): one forward
    per port across it. ``burrow.Sandbox`` forwards its ports under its own."""

    def config(self) -> AgentConfig:
        """Resolve the agent's configuration: arguments, then the environment, then a
        running ``burrow dev``."""
        env: dict[str, str] = dict(os.environ)
        if not (self.relay or env.get(ENV_RELAY)) and not (self.token or env.get(ENV_TOKEN)):
            env.update(running_dev_env() or {})
        given = ",".join(self.relay) if isinstance(self.relay, (list, tuple)) else self.relay
        relay = given or env.get(ENV_RELAY)
        token = self.token or env.get(ENV_TOKEN)
        ca = self.ca or env.get(ENV_CA) or None
        if not relay or not token:
            missing = [
                name for name, value in ((ENV_RELAY, relay), (ENV_TOKEN, token)) if not value
            ]
            raise InvalidError(
                "Forwarding works only inside a burrow workload: no relay credentials "
                f"were found ({', '.join(missing)} not set). Set {ENV_RELAY} and {ENV_TOKEN} "
                f"(and {ENV_CA} for a private CA), run `burrow dev` on this machine, "
                "or pass client=burrow.Client(relay=..., token=...)."
            )
        plain = self.plain_data
        if plain is None:
            plain = env.get(ENV_PLAIN_DATA, "").strip().lower() in ("1", "true", "yes")
        if not isinstance(relay, str) or not pick.parse_relays(relay):
            raise InvalidError(f"{ENV_RELAY} names no relay: {relay!r}")
        for entry in pick.parse_relays(relay):
            names.parse_address(entry, 443)  # InvalidError naming the bad one
        failover: float | None = None
        if env.get(ENV_FAILOVER_SECONDS):
            try:
                failover = float(env[ENV_FAILOVER_SECONDS])
            except ValueError:
                raise InvalidError(
                    f"{ENV_FAILOVER_SECONDS} must be a number of seconds, "
                    f"not {env[ENV_FAILOVER_SECONDS]!r}"
                ) from None
        return AgentConfig(
            relay=",".join(pick.parse_relays(relay)),
            failover=failover,
            token=token.strip(),
            ca=Path(ca) if ca else None,
            plain_data=plain,
            workload=self.workload or env.get(ENV_WORKLOAD) or None,
        )


def workload_env(config: AgentConfig, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) plus the variables that
    let ``burrow.forward()`` inside a workload reach the relay as ``config`` does."""
    env = dict(os.environ if base is None else base)
    env[ENV_RELAY] = config.relay
    env[ENV_TOKEN] = config.token
    if config.ca is not None:
        env[ENV_CA] = str(config.ca)
    if config.plain_data:
        env[ENV_PLAIN_DATA] = "1"
    if config.workload is not None:
        env[ENV_WORKLOAD] = config.workload
    return env


class _Runtime:
    """The background thread and event loop that every tunnel of the process shares."""

    def __init__(self) -> None:
        self._thread = LoopThread("burrow-agent")
        self._sessions: dict[AgentConfig, AgentSession] = {}
        self._session_locks: dict[AgentConfig, asyncio.Lock] = {}
        # Local ports with a live forward() in this process (touched on the agent loop only).
        self.forwarded_ports: set[int] = set()

    def loop(self) -> asyncio.AbstractEventLoop:
        """The agent loop, started (with the open-file limit raised) on first use."""
        if self._thread.thread is None:
            raise_open_file_limit()
        return self._thread.loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        self.loop()
        return self._thread.submit(coro)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the agent loop and wait for it from a plain thread."""
        if self._thread.in_loop_thread():
            coro.close()
            raise InvalidError("burrow's blocking API cannot be called from its own event loop")
        return self.submit(coro).result()

    async def session(self, config: AgentConfig) -> AgentSession:
        """The live session for this configuration, connecting one if needed (on the agent loop)."""
        lock = self._session_locks.setdefault(config, asyncio.Lock())
        async with lock:
            session = self._sessions.get(config)
            if session is None or session.closed:
                session = await AgentSession.connect(config)
                self._sessions[config] = session
            return session

    async def close_session(self, config: AgentConfig) -> None:
        """End the session for exactly this configuration, if there is one (on the agent loop)."""
        session = self._sessions.pop(config, None)
        self._session_locks.pop(config, None)
        if session is not None:
            await session.close()

    async def close_all(self, relay: str | None = None) -> None:
        """End this process's sessions (with the relay at ``relay`` only, if given)."""
        for config, session in list(self._sessions.items()):
            if relay is None or config.relay == relay:
                del self._sessions[config]
                await session.close()


runtime = _Runtime()


def _check_port(port: object) -> int:
    if not isinstance(port, int) or isinstance(port, bool):
        raise InvalidError(f"The port argument should be an int, not {port!r}")
    if not 1 <= port <= 65535:
        raise InvalidError(f"Invalid port number {port}")
    return port


async def _on_end(session: AgentSession, callback: Callable[[BaseException], None]) -> None:
    if session.closed:
        callback(session.ended or ConnectionError("the session has ended"))
    else:
        session.on_end(callback)


class forward:
    """Publish a local port for the duration of a ``with`` or ``async with`` block.

    ``forward(port)`` gives an HTTPS address whose TLS the relay ends;
    ``unencrypted=True`` also gives a raw TCP socket; ``h2_enabled=True``
    lets visitors speak HTTP/2 (the local server must then accept h2c).
    ``inbound_cidr_allowlist`` limits visitors, on both, to those networks
    (``["203.0.113.0/24", "2001:db8::/32"]``); the relay turns everyone else
    away before they reach this process. ``[]`` lets no one in.
    """

    def __init__(
        self,
        port: int,
        *,
        unencrypted: bool = False,
        h2_enabled: bool = False,
        inbound_cidr_allowlist: Sequence[str] | None = None,
        client: Client | None = None,
    ) -> None:
        self.port = _check_port(port)
        if h2_enabled and unencrypted:
            raise InvalidError("H2 can only be used with encrypted ports")
        self.unencrypted = unencrypted
        self.h2_enabled = h2_enabled
        self.allow: str | None = None
        if inbound_cidr_allowlist is not None:
            try:
                networks = allowlist.parse(inbound_cidr_allowlist)
            except InvalidError as exc:
                raise InvalidError(f"inbound_cidr_allowlist: {exc}") from None
            self.allow = allowlist.to_wire(networks)
        self.config = (client or Client()).config()
        self._tunnel: Tunnel | None = None
        self._tunnel_id: int | None = None
        self._session: AgentSession | None = None

    async def _open(self) -> Tunnel:
        # One process forwards a port once, whatever relay or token it uses.
        if self.port in runtime.forwarded_ports:
            raise InvalidError(f"Port {self.port} is already forwarded")
        runtime.forwarded_ports.add(self.port)
        try:
            session = await runtime.session(self.config)
            tunnel = await session.open_tunnel(
                self.port, tcp=self.unencrypted, h2=self.h2_enabled, allow=self.allow
            )
        except BaseException:
            runtime.forwarded_ports.discard(self.port)
            raise
        self._session = session
        self._tunnel = tunnel
        self._tunnel_id = session.tunnel_id(tunnel)
        return tunnel

    async def _close(self) -> None:
        try:
            current = self._current()
            if self._session is not None and current is not None:
                await self._session.close_tunnel(current.tunnel)
        finally:
            if self._tunnel is not None:
                runtime.forwarded_ports.discard(self.port)
            self._session = None
            self._tunnel = None
            self._tunnel_id = None

    @property
    def tunnel(self) -> Tunnel:
        """The tunnel as it is now: the one the ``with`` block got, or, after its session
        moved to another relay, the new one (with new names). Inside the block only."""
        current = self._current()
        if current is None:
            raise InvalidError("forward().tunnel is for a forward inside its with block")
        return current.tunnel

    def on_move(self, callback: Callable[[Tunnel, Tunnel], None]) -> None:
        """Call ``callback(old, new)`` (on the agent's thread) when the tunnel moves to
        another relay, its old relay gone for longer than a restart takes. A ``Tunnel``
        never changes: ``new`` has the new names, and :attr:`tunnel` is ``new`` from then on.
        """
        current = self._current()
        if current is None:
            raise InvalidError("on_move() is for a forward inside its with block")
        current.on_move.append(callback)

    def _current(self) -> AgentTunnel | None:
        if self._session is None or self._tunnel_id is None:
            return None
        return self._session.tunnels.get(self._tunnel_id)

    def when_ended(self, callback: Callable[[BaseException], None]) -> None:
        """Call ``callback(reason)`` (on the agent's thread) if the session carrying the
        tunnel ends for good: an error the agent does not retry, such as a revoked
        token or an operator ending the session. Inside the ``with`` block only."""
        session = self._session
        if session is None:
            raise InvalidError("when_ended() is for a forward inside its with block")
        runtime.submit(_on_end(session, callback)).result()

    def __enter__(self) -> Tunnel:
        return runtime.run(self._open())

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        runtime.run(self._close())

    async def __aenter__(self) -> Tunnel:
        return await asyncio.wrap_future(runtime.submit(self._open()))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.wrap_future(runtime.submit(self._close()))
