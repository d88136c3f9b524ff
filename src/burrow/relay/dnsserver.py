"""The relay's DNS listeners: UDP and TCP sockets around a :class:`~burrow.relay.dns.Zone`.

UDP queries pass the per-source rate limit first (answered, answered with
TC, or dropped); TCP queries, whose source is proven by the handshake, are
only bounded by connection caps and an idle timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, cast

from burrow.relay.config import RelayConfig
from burrow.relay.dns import TCP_MAX_MESSAGE, UDP_MAX_PAYLOAD, SourceLimits, Verdict, Zone
from burrow.relay.handshakes import source_of

log = logging.getLogger("burrow.relay.dns")

# A TCP connection that sends no complete query for this long is closed.
# RFC 7766 asks for seconds, not minutes; resolvers that reuse a connection
# send their next query well within it.
TCP_IDLE_TIMEOUT: Final = 10.0

# TCP connections open at once, in total and from one source (IPv6: /64).
# Each costs a socket and a task; resolvers open one or two at a time, and
# only after a truncated answer. Past a cap a new connection is closed at once.
MAX_TCP_CONNECTIONS: Final = 512
MAX_TCP_CONNECTIONS_PER_SOURCE: Final = 16

# Kernel receive buffer of a UDP socket: a burst of queries waits here while
# the loop is busy instead of being dropped by the kernel.
UDP_RECEIVE_BUFFER: Final = 1024 * 1024

LISTEN_BACKLOG: Final = 128

# A port picked for UDP may be taken for TCP; tries before giving up.
BIND_ATTEMPTS: Final = 20


def bind_dns(addresses: Sequence[tuple[str, int]]) -> list[socket.socket]:
    """A UDP and a TCP socket on each (host, port), both on the same port.

    A port of 0 picks a free one (the UDP socket's), which the TCP socket and
    later addresses with port 0 share; if TCP finds it taken, another is
    picked. Made before worker processes fork, so that a restarted worker
    finds them open.
    """
    for _ in range(BIND_ATTEMPTS - 1):
        try:
            return _bind_dns(addresses)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or all(port for _, port in addresses):
                raise
    return _bind_dns(addresses)


def _bind_dns(addresses: Sequence[tuple[str, int]]) -> list[socket.socket]:
    sockets: list[socket.socket] = []
    chosen = 0
    try:
        for host, port in addresses:
            port = port or chosen
            family, _, _, _, addr = socket.getaddrinfo(
                host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
            )[0]
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                sock = socket.socket(family, kind)
                sockets.append(sock)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if kind == socket.SOCK_STREAM:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                else:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
                sock.bind(addr)
                if kind == socket.SOCK_STREAM:
                    sock.listen(LISTEN_BACKLOG)
                else:
                    addr = sock.getsockname()  # port 0: TCP takes the port UDP got
                sock.setblocking(False)
            chosen = chosen or sockets[-1].getsockname()[1]
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport is not an asyncio.DatagramTransport subclass.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        server = self.server
        host, port = addr[0], addr[1]
        if port == 0 or self.transport is None:
            return  # nowhere to answer
        verdict = server.limits.check(host, server.clock())
        try:
            if verdict is Verdict.ANSWER:
                response = server.zone.answer(data, max_size=UDP_MAX_PAYLOAD)
            elif verdict is Verdict.SLIP:
                server.zone.count_rate_limited()
                response = server.zone.truncated(data)
            else:
                server.zone.count_rate_limited()
                response = None
        except Exception:  # a bug in the zone: logged, and the listener goes on
            log.exception("answering a query from %s", host)
            return
        server.counts[verdict] += 1
        if response is not None:
            self.transport.sendto(response, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier answers (a port gone, a host unreachable).
        log.debug("UDP: %s", exc)


class DnsServer:
    """The zone served on UDP and TCP sockets of one event loop."""

    def __init__(self, zone: Zone, limits: SourceLimits, clock: Callable[[], float]) -> None:
        self.zone = zone
        self.limits = limits
        self.clock = clock
        self.counts: dict[Verdict, int] = dict.fromkeys(Verdict, 0)
        """UDP queries seen, by what the rate limit made of them."""
        self.listening: list[tuple[str, str, int]] = []
        """("udp" or "tcp", host, port) of every socket served."""
        self._udp: list[asyncio.DatagramTransport] = []
        self._tcp: list[asyncio.Server] = []
        self._connections: dict[asyncio.StreamWriter, str] = {}
        self._per_source: dict[str, int] = {}

    @classmethod
    async def start(
        cls,
        zone: Zone,
        sockets: Sequence[socket.socket],
        *,
        limits: SourceLimits | None = None,
    ) -> DnsServer:
        """Serve ``zone`` on ``sockets`` (from :func:`bind_dns`), which it then owns."""
        loop = asyncio.get_running_loop()
        server = cls(zone, SourceLimits() if limits is None else limits, loop.time)
        try:
            for sock in sockets:
                host, port = sock.getsockname()[:2]
                if sock.type == socket.SOCK_DGRAM:
                    transport, _ = await loop.create_datagram_endpoint(
                        lambda: _Udp(server), sock=sock
                    )
                    server._udp.append(transport)
                    server.listening.append(("udp", host, port))
                else:
                    server._tcp.append(await asyncio.start_server(server._serve_tcp, sock=sock))
                    server.listening.append(("tcp", host, port))
        except BaseException:
            await server.close()
            for sock in sockets:
                sock.close()
            raise
        for kind, host, port in server.listening:
            log.info("DNS for %s on %s %s:%d", zone.origin, kind, host, port)
        return server

    async def close(self) -> None:
        for transport in self._udp:
            transport.close()
        for tcp in self._tcp:
            tcp.close()
        for writer in list(self._connections):
            writer.transport.abort()
        for tcp in self._tcp:
            with contextlib.suppress(Exception):
                await tcp.wait_closed()
        self._udp.clear()
        self._tcp.clear()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        source = source_of(str(peer[0])) if peer else "?"
        if (
            len(self._connections) >= MAX_TCP_CONNECTIONS
            or self._per_source.get(source, 0) >= MAX_TCP_CONNECTIONS_PER_SOURCE
        ):
            writer.transport.abort()
            return
        self._connections[writer] = source
        self._per_source[source] = self._per_source.get(source, 0) + 1
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE_TIMEOUT):
                    length = int.from_bytes(await reader.readexactly(2), "big")
                    query = await reader.readexactly(length)
                response = self.zone.answer(query, max_size=TCP_MAX_MESSAGE, tcp=True)
                if response is None:
                    break  # not a query we can even answer FORMERR to: the stream is lost
                writer.write(len(response).to_bytes(2, "big") + response)
                async with asyncio.timeout(TCP_IDLE_TIMEOUT):
                    await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, OSError):
            pass
        except Exception:
            log.exception("answering a query over TCP from %s", source)
        finally:
            writer.close()  # the last answer is flushed first, unless the peer stops reading
            with contextlib.suppress(Exception):
                async with asyncio.timeout(TCP_IDLE_TIMEOUT):
                    await writer.wait_closed()
            writer.transport.abort()
            del self._connections[writer]
            left = self._per_source.pop(source) - 1
            if left:
                self._per_source[source] = left


def dns_zone(config: RelayConfig) -> Zone | None:
    """The zone ``config`` asks the relay to serve (``dns_listen``), else None.

    Its SOA serial starts at the time in seconds, so that a restarted relay's
    is higher than before.
    """
    if not config.dns_listen:
        return None
    return Zone(
        config.domain,
        config.public_ips,
        serial=int(time.time()),
        caa_issuer=config.dns_caa,
        only_acme=config.dns_only_acme,
    )


async def start_dns(
    config: RelayConfig,
    sockets: Sequence[socket.socket] | None = None,
    zone: Zone | None = None,
) -> DnsServer | None:
    """The relay's DNS server when ``config.dns_listen`` asks for one, else None.

    ``sockets`` are :func:`bind_dns`'s, bound before workers fork (the server
    owns them from here); without them ``config.dns_listen`` is bound here.
    ``zone`` defaults to :func:`dns_zone`'s; it is where the ACME client
    publishes its challenge values (``zone.set_challenge``).
    """
    zone = zone or dns_zone(config)
    if zone is None:
        return None
    if sockets is None:
        sockets = bind_dns(config.dns_listen)
    limits = SourceLimits(config.dns_rate, config.dns_burst)
    return await DnsServer.start(zone, sockets, limits=limits)
