"""A network path with a round-trip time, in user space: a delaying TCP forwarder.

    python tests/netpath.py --listen 127.0.0.1:9441 --to 127.0.0.1:8441 --rtt-ms 20

This kernel has no netem, so the tests' distances are made here: every
connection accepted on ``--listen`` is joined to a new connection to
``--to``, and each chunk read on one side is written to the other half the
round-trip time later, in order. What a real path of that length does, and
this one too:

- a new connection costs a round trip before the client's first byte can
  leave (the SYN and SYN-ACK), and the server's first byte reaches the
  client two round trips after the connect (RFC 793's three-way handshake);
  a refused connect reaches the client as a reset one round trip later;
- EOF (a half-close) and resets cross the path in order, after the data
  sent before them;
- bytes in flight are bounded (``--window``, TCP's window): a chunk counts
  until its "ACK" has come back, half a round trip after it was delivered,
  so one stream moves at most window / RTT, the bandwidth-delay product;
  past it the forwarder stops reading and the sender's kernel pushes back;
- ``--rate`` is the bottleneck link's speed: chunks leave one after another
  at that rate (serialisation delay) before they travel.

It does not model loss or slow start: a fresh connection gets the whole
window at once.

Commands, one a line on standard input, each answered with ``ok``:
``silent`` (stop forwarding and accepting, closing nothing: a path that
drops everything), ``flow`` (forward again), ``reset`` (reset every
connection on both sides at once). It prints ``listening PORT`` once it
accepts connections and exits when its standard input closes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import socket
import struct
import sys
from dataclasses import dataclass, field
from typing import Final

# One read from a socket: small enough that a rate limit paces smoothly.
CHUNK: Final = 64 * 1024
# Linux autotunes a connection's receive window up to about this much
# (net.ipv4.tcp_rmem's 6 MiB maximum, less its share kept for overhead).
DEFAULT_WINDOW: Final = 4 * 1024 * 1024
# asyncio's selector sleeps whole milliseconds, rounding up: a timer set this
# much early fires within half a millisecond of its time, either side.
TIMER_BIAS: Final = 0.0005
# The listening socket's backlog: a burst of visitors is not turned away here.
BACKLOG: Final = 4096

EOF: Final = b""


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a reset (RST) instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@dataclass
class Path:
    """The path's settings and its state: flowing or silent, and its connections."""

    target: tuple[str, int]
    one_way: float
    rate: float | None  # bytes per second
    window: int
    flowing: asyncio.Event = field(default_factory=asyncio.Event)
    connections: set[Connection] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.flowing.set()


class Direction:
    """Bytes from one side to the other: a queue of (due time, chunk), bounded by the window."""

    def __init__(self, path: Path, src: socket.socket, dst: socket.socket, first: float) -> None:
        self.path = path
        self.src, self.dst = src, dst
        self.first = first  # nothing leaves before the handshake lets this side send
        self.link_free = first
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.ready = asyncio.Event()
        self.in_flight = 0
        self.space = asyncio.Event()
        self.space.set()

    def push(self, data: bytes | None) -> None:
        """Queue ``data`` (EOF: b"", a reset: None) to arrive one way later."""
        loop = asyncio.get_running_loop()
        leave = max(loop.time(), self.link_free)
        if data and self.path.rate:
            leave += len(data) / self.path.rate
        self.link_free = leave
        self.queue.append((leave + self.path.one_way, data))
        self.ready.set()
        if data:
            self.in_flight += len(data)
            if self.in_flight >= self.path.window:
                self.space.clear()

    def acked(self, size: int) -> None:
        self.in_flight -= size
        if self.in_flight < self.path.window:
            self.space.set()

    async def read(self) -> bool | None:
        """Read from ``src`` into the queue until EOF or a reset."""
        loop = asyncio.get_running_loop()
        while True:
            await self.space.wait()
            await self.path.flowing.wait()
            try:
                data = await loop.sock_recv(self.src, CHUNK)
            except OSError:
                self.push(None)
                return None
            self.push(data)
            if not data:
                return None

    async def write(self) -> bool:
        """Deliver the queue to ``dst`` on time; True at EOF, False on a reset."""
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.ready.clear()
                await self.ready.wait()
            due, data = self.queue.popleft()
            if (wait := due - loop.time()) > 0:
                # The selector waits whole milliseconds, rounded up: aim half of one early.
                await asyncio.sleep(wait - TIMER_BIAS)
            await self.path.flowing.wait()
            if data is None:
                return False
            if not data:
                with contextlib.suppress(OSError):
                    self.dst.shutdown(socket.SHUT_WR)
                return True
            try:
                await loop.sock_sendall(self.dst, data)
            except OSError:
                return False
            # The ACK travels back before the window opens again.
            ack_at = max(loop.time(), due) + self.path.one_way
            loop.call_at(ack_at, self.acked, len(data))


class Connection:
    def __init__(self, path: Path, client: socket.socket) -> None:
        self.path = path
        self.client = client
        self.server: socket.socket | None = None
        self.task: asyncio.Task[None] | None = None
        self.directions: list[asyncio.Task[bool | None]] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        d = self.path.one_way
        accepted = loop.time()
        await asyncio.sleep(d)  # the SYN reaches the server's side
        await self.path.flowing.wait()
        server = socket.socket(socket.AF_INET6 if ":" in self.path.target[0] else socket.AF_INET)
        server.setblocking(False)
        server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server = server
        try:
            await loop.sock_connect(server, self.path.target)
        except OSError:
            await asyncio.sleep(max(0.0, accepted + 2 * d - loop.time()))  # the RST comes back
            self.abort()
            return
        # The client may send once the SYN-ACK is back; the server learns of the
        # connection when the client's ACK arrives, half a round trip after that.
        up = Direction(self.path, self.client, server, first=accepted + 2 * d)
        down = Direction(self.path, server, self.client, first=accepted + 3 * d)
        writers = [loop.create_task(up.write()), loop.create_task(down.write())]
        self.directions = [loop.create_task(up.read()), loop.create_task(down.read()), *writers]
        pending: set[asyncio.Task[bool | None]] = set(writers)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if not all(task.result() for task in done):
                # A reset arrived: it ends the connection on both sides.
                self.abort()
                return
        self.close()

    def close(self) -> None:
        for task in self.directions:
            task.cancel()
        self.client.close()
        if self.server is not None:
            self.server.close()

    def abort(self) -> None:
        for task in self.directions:
            task.cancel()
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        _reset(self.client)
        if self.server is not None:
            _reset(self.server)


async def serve(path: Path, listen: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
    listener = socket.socket(family)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(listen)
    listener.listen(BACKLOG)
    listener.setblocking(False)
    print(f"listening {listener.getsockname()[1]}", flush=True)

    async def accept() -> None:
        while True:
            await path.flowing.wait()
            client, _ = await loop.sock_accept(listener)
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connection = Connection(path, client)
            path.connections.add(connection)
            connection.task = loop.create_task(connection.run())
            connection.task.add_done_callback(lambda _, c=connection: path.connections.discard(c))

    accepting = loop.create_task(accept())
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            command = line.decode().strip()
            if command == "silent":
                path.flowing.clear()
            elif command == "flow":
                path.flowing.set()
            elif command == "reset":
                for connection in list(path.connections):
                    connection.abort()
            else:
                print(f"unknown command {command!r}", flush=True)
                continue
            print("ok", flush=True)
    finally:
        accepting.cancel()
        listener.close()
        for connection in list(path.connections):
            connection.abort()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=_address, required=True, help="HOST:PORT (port 0: any)")
    parser.add_argument("--to", type=_address, required=True, help="HOST:PORT to forward to")
    parser.add_argument("--rtt-ms", type=float, required=True, help="round-trip time it adds")
    parser.add_argument("--rate-mbit", type=float, help="the link's speed (default: no limit)")
    parser.add_argument(
        "--window", type=int, default=DEFAULT_WINDOW, help="bytes in flight each way"
    )
    args = parser.parse_args()
    path = Path(
        target=args.to,
        one_way=args.rtt_ms / 2000,
        rate=args.rate_mbit * 1e6 / 8 if args.rate_mbit else None,
        window=args.window,
    )
    # Not uvloop: libuv's clock counts whole milliseconds, asyncio's is exact.
    asyncio.run(serve(path, args.listen))


if __name__ == "__main__":
    main()
