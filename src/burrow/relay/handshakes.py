"""The unfinished TLS handshakes of the public port: how many are kept, in total and per source.

Anyone may open a socket to the relay and send nothing. Each such socket is
kept only until its handshake ends, and past either cap the oldest goes
first: the whole relay's oldest past the total, the source's own oldest past
the per-source cap, so one address crowding the port mostly evicts itself.
Sans-IO: connections are opaque keys; the relay closes what it is told to drop.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable
from typing import Final, Generic, TypeVar

# IPv6 sources are counted per /64: one host is commonly given a whole /64,
# so counting single addresses would give an attacker 2**64 sources.
IPV6_SOURCE_PREFIX: Final = 64

Conn = TypeVar("Conn", bound=Hashable)


def source_of(host: str) -> str:
    """The source a peer's address counts against: itself (IPv4), its /64 (IPv6)."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host  # not an IP address (a Unix socket, say): counted as itself
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_SOURCE_PREFIX), strict=False))
    return str(address)


class Handshakes(Generic[Conn]):
    """Connections whose handshake has not finished, oldest first, in total and per source."""

    def __init__(self, total: int, per_source: int) -> None:
        self.total = total
        self.per_source = per_source
        # dicts keep insertion order: the first key is the oldest.
        self._all: dict[Conn, str | None] = {}
        self._by_source: dict[str, dict[Conn, None]] = {}

    def __len__(self) -> int:
        return len(self._all)

    def __contains__(self, conn: object) -> bool:
        return conn in self._all

    def from_source(self, source: str) -> int:
        return len(self._by_source.get(source, ()))

    def add(self, conn: Conn) -> list[Conn]:
        """A new connection, its address not known yet; returns those to drop to make room."""
        dropped: list[Conn] = []
        while self._all and len(self._all) >= self.total:
            oldest = next(iter(self._all))
            self.discard(oldest)
            dropped.append(oldest)
        self._all[conn] = None
        return dropped

    def place(self, conn: Conn, host: str) -> list[Conn]:
        """``conn`` comes from ``host``; returns the oldest of that source to drop past its cap."""
        if conn not in self._all:
            return []
        source = source_of(host)
        self._all[conn] = source
        peers = self._by_source.setdefault(source, {})
        peers[conn] = None
        dropped: list[Conn] = []
        while len(peers) > self.per_source:
            oldest = next(iter(peers))
            self.discard(oldest)
            dropped.append(oldest)
        return dropped

    def discard(self, conn: Conn) -> None:
        """``conn``'s handshake is over (done, failed, or it was dropped)."""
        if conn not in self._all:
            return
        source = self._all.pop(conn)
        if source is None:
            return
        peers = self._by_source[source]
        del peers[conn]
        if not peers:
            del self._by_source[source]
