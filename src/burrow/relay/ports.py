"""TCP ports for raw TCP tunnels: a free port of the configured range, and who had it last.

A port cannot be made unguessable, so the choice is only random enough to
spread tunnels over the range. A port freed by a tunnel stays out of
circulation for :data:`PORT_GRACE_SECONDS`, except for the token that held
it (its agent takes it back with its claim), and after that the least
recently freed port goes first: a lost session's visitors must not reach
another tenant's tunnel. Binding, the random choice and the clock are
injected, so that which ports are tried, and in what order, can be tested
without a socket or a wait (as frp's port manager does).
"""

from __future__ import annotations

import collections
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Final, Protocol

# Attempts at binding a random port of the TCP range before giving up; the
# range is usually mostly free, so a few tries find one.
TCP_PORT_ATTEMPTS: Final = 64

# How long a freed port is kept for the token that held it. An agent notices
# a lost session within three heartbeats and tries again at least every 10 s
# (agent/session.py), so ten minutes covers a relay restart, a network outage
# or a laptop lid closed for a coffee, while a small range still turns over.
PORT_GRACE_SECONDS: Final = 600.0


class Listener(Protocol):
    """What a bind returns: something listening that can be closed (an ``asyncio.Server``)."""

    def close(self) -> None: ...


# (host, port) -> a listener on it, or OSError when the port is taken.
Bind = Callable[[str, int], Awaitable[Listener]]


class TcpPorts:
    """Binds raw TCP tunnels to ports of ``low``-``high`` on every one of ``hosts``.

    As one of ``share[1]`` relay workers (``share[0]`` being this one), it
    hands out only every ``share[1]``-th port of the range, so that no two
    workers give out, or hold back, the same port.
    """

    def __init__(
        self,
        hosts: list[str],
        port_range: tuple[int, int],
        *,
        choose: Callable[[int, int], int] = random.randint,
        attempts: int = TCP_PORT_ATTEMPTS,
        clock: Callable[[], float] = time.monotonic,
        grace: float = PORT_GRACE_SECONDS,
        share: tuple[int, int] = (0, 1),
    ) -> None:
        """``choose(low, high)`` picks a candidate (inclusive), as ``random.randint`` does;
        ``clock`` is monotonic time in seconds."""
        self.hosts = hosts
        self.low, self.high = port_range
        self.clock = clock
        self.grace = grace
        self._choose = choose
        self._attempts = attempts
        self._index, self._count = share
        self._in_use: set[int] = set()
        # port -> (token id that held it, when it was freed), least recently freed first.
        self._freed: collections.OrderedDict[int, tuple[str, float]] = collections.OrderedDict()

    @property
    def in_use(self) -> frozenset[int]:
        return frozenset(self._in_use)

    def held_for(self, port: int) -> str | None:
        """The token a freed ``port`` is still kept for, or None."""
        freed = self._freed.get(port)
        if freed is None or self.clock() - freed[1] >= self.grace:
            return None
        return freed[0]

    def _mine(self, port: int) -> bool:
        return self.low <= port <= self.high and (port - self.low) % self._count == self._index

    def candidates(self, port: int | None = None, *, owner: str = "") -> Iterator[int]:
        """The ports to try for the token ``owner``, in order.

        ``port`` alone if given (a claim), unless it is in use or kept for
        another token. Otherwise ports never handed out, random picks first,
        then the ports freed longer ago than the grace period, least
        recently freed first.
        """
        if port:
            holder = self.held_for(port)
            if port not in self._in_use and holder in (None, owner):
                yield port
            return
        size = (self.high - self._index - self.low) // self._count + 1
        if size <= 0:
            return
        tried: set[int] = set()

        def fresh(offset: int) -> int | None:
            candidate = self.low + self._index + offset * self._count
            if candidate in tried or candidate in self._in_use or candidate in self._freed:
                return None
            tried.add(candidate)
            return candidate

        for _ in range(self._attempts):
            candidate = fresh(self._choose(0, size - 1))
            if candidate is not None:
                yield candidate
        # A nearly full range defeats random picks: then every port left, in turn.
        start = self._choose(0, size - 1)
        for step in range(size):
            candidate = fresh((start + step) % size)
            if candidate is not None:
                yield candidate
        now = self.clock()
        for candidate, (_, freed_at) in list(self._freed.items()):
            if now - freed_at < self.grace:
                continue  # still kept (a port let go early may come later in line)
            if candidate not in self._in_use:
                yield candidate

    async def bind(
        self, bind: Bind, port: int | None = None, *, owner: str = ""
    ) -> tuple[int, list[Listener]]:
        """Listen on ``port``, or on a free port of the range, for the token ``owner``:
        (the port, its listeners).

        A candidate must be free on every host; one that is not is released
        on all of them before the next is tried. Raises :class:`OSError` when
        none is free. Give the port back with :meth:`release`.
        """
        last_error: OSError | None = None
        for candidate in self.candidates(port, owner=owner):
            listeners: list[Listener] = []
            try:
                for host in self.hosts:
                    listeners.append(await bind(host, candidate))
            except OSError as exc:
                last_error = exc
                for listener in listeners:
                    listener.close()
                continue
            self._in_use.add(candidate)
            self._freed.pop(candidate, None)
            return candidate, listeners
        if port:
            if last_error is None:
                why = "another tunnel has it" if port in self._in_use else "kept for its last token"
                raise OSError(f"TCP port {port} is not free: {why}")
            raise OSError(f"TCP port {port} is not free: {last_error}")
        if last_error is None:
            raise OSError(
                f"no free port in the TCP range {self.low}-{self.high}: every port is in use "
                f"or kept for {self.grace:.0f}s for the tunnel that had it"
            )
        raise OSError(f"no free port found in the TCP range {self.low}-{self.high}: {last_error}")

    def release(self, port: int, owner: str, *, keep: int | None = None) -> None:
        """``port`` is free again; keep it for the token ``owner`` for the grace period.

        ``owner`` keeps at most ``keep`` ports (its tunnel limit: no more than
        its agent could ever take back at once); past that, its longest-kept
        port is free for anyone at once, so that a token opening and closing
        TCP tunnels cannot hold the whole range.
        """
        if port not in self._in_use:
            return
        self._in_use.discard(port)
        self._freed.pop(port, None)
        now = self.clock()
        self._freed[port] = (owner, now)
        if keep is None:
            return
        kept = [p for p, (o, at) in self._freed.items() if o == owner and now - at < self.grace]
        for oldest in kept[: max(0, len(kept) - keep)]:
            # As if freed a grace period ago; it keeps its place in line.
            self._freed[oldest] = (owner, now - self.grace)
