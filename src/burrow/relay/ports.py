"""TCP ports for raw TCP tunnels: a random free port of the configured range.

A port cannot be made unguessable, so the choice is only random enough to
spread tunnels over the range. Binding is injected (the relay passes
``loop.create_server``), and so is the random choice, so that which ports
are tried, and in what order, can be tested without a socket.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Iterator
from typing import Final, Protocol

# Attempts at binding a random port of the TCP range before giving up; the
# range is usually mostly free, so a few tries find one.
TCP_PORT_ATTEMPTS: Final = 64


class Listener(Protocol):
    """What a bind returns: something listening that can be closed (an ``asyncio.Server``)."""

    def close(self) -> None: ...


# (host, port) -> a listener on it, or OSError when the port is taken.
Bind = Callable[[str, int], Awaitable[Listener]]


class TcpPorts:
    """Binds raw TCP tunnels to ports of ``low``-``high`` on every one of ``hosts``."""

    def __init__(
        self,
        hosts: list[str],
        port_range: tuple[int, int],
        *,
        choose: Callable[[int, int], int] = random.randint,
        attempts: int = TCP_PORT_ATTEMPTS,
    ) -> None:
        """``choose(low, high)`` picks a candidate (inclusive), as ``random.randint`` does."""
        self.hosts = hosts
        self.low, self.high = port_range
        self._choose = choose
        self._attempts = attempts

    def candidates(self, port: int | None = None) -> Iterator[int]:
        """The ports to try, in order: ``port`` alone if given, else random picks."""
        if port:
            yield port
            return
        for _ in range(self._attempts):
            yield self._choose(self.low, self.high)

    async def bind(self, bind: Bind, port: int | None = None) -> tuple[int, list[Listener]]:
        """Listen on ``port``, or on a free port of the range: (the port, its listeners).

        A candidate must be free on every host; one that is not is released
        on all of them before the next is tried. Raises :class:`OSError` when
        none is free.
        """
        last_error: OSError | None = None
        for candidate in self.candidates(port):
            listeners: list[Listener] = []
            try:
                for host in self.hosts:
                    listeners.append(await bind(host, candidate))
            except OSError as exc:
                last_error = exc
                for listener in listeners:
                    listener.close()
                continue
            return candidate, listeners
        if port:
            raise OSError(f"TCP port {port} is not free: {last_error}")
        raise OSError(f"no free port found in the TCP range {self.low}-{self.high}: {last_error}")
