"""Tunnel: where a forwarded port can be reached, as ``burrow.forward()`` yields it."""

from __future__ import annotations

from dataclasses import dataclass

from burrow.exception import InvalidError


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
