"""Tunnel: where a forwarded port can be reached, as ``burrow.forward()`` yields it."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from burrow._aio import dual_method
from burrow.exception import InvalidError
from burrow.net import ready


@dataclass(frozen=True)
class Tunnel:
    """The public addresses of one forwarded port."""

    host: str
    """The tunnel's TLS name, ``<label>.<relay domain>``."""

    port: int
    """The relay's public TLS port (443 in production)."""

    unencrypted_host: str | None = None
    """Host of the raw TCP socket, when forwarded with ``unencrypted=True``."""

    unencrypted_port: int | None = None
    """Port of the raw TCP socket, when forwarded with ``unencrypted=True``."""

    local_port: int | None = field(default=None, compare=False)
    """The port on this machine that the tunnel leads to (burrow's own, not in Modal)."""

    @property
    def url(self) -> str:
        """``https://host``, with ``:port`` only when the port is not 443."""
        if self.port == 443:
            return f"https://{self.host}"
        return f"https://{self.host}:{self.port}"

    @property
    def tls_socket(self) -> tuple[str, int]:
        """(host, port) to open a TLS connection to; the relay ends the TLS."""
        return (self.host, self.port)

    @property
    def tcp_socket(self) -> tuple[str, int]:
        """(host, port) of the raw TCP socket; only with ``unencrypted=True``."""
        if self.unencrypted_host is None or self.unencrypted_port is None:
            raise InvalidError(
                "This tunnel is not configured for unencrypted TCP. "
                "Please use `forward(..., unencrypted=True)`."
            )
        return (self.unencrypted_host, self.unencrypted_port)

    async def _wait_ready(
        self,
        timeout: float = 60.0,  # noqa: ASYNC109 - the public API's name
        *,
        http_path: str | None = None,
    ) -> None:
        if self.local_port is None:
            raise InvalidError(
                "This Tunnel does not know its local port; use one that forward() yields"
            )
        await ready.wait_ready(self.local_port, timeout=timeout, http_path=http_path, url=self.url)

    wait_ready = dual_method(_wait_ready, lambda coro: _run_blocking(coro), lambda coro: coro)
    """Wait until the server behind the tunnel accepts connections.

    ``tunnel.wait_ready(timeout=60)`` blocks; ``await tunnel.wait_ready.aio(...)``
    is the async form. Ready means the local port accepts a TCP connection,
    or, with ``http_path="/health"``, that an HTTP/1.1 GET of that path gets
    an answer below 500. After ``timeout`` seconds it raises
    ``burrow.exception.NotReadyError`` naming the port, the URL and why.
    """


def _run_blocking(coro: Coroutine[Any, Any, None]) -> None:
    """Run a readiness wait from a plain thread, on a loop of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coro)
        return
    coro.close()
    raise InvalidError("wait_ready() blocks; in async code use `await tunnel.wait_ready.aio(...)`")
