"""InspectedSplice: a splice whose bytes pass through an inspector (the relay's h2 check).

Real loopback sockets and plain streams, the pair that would otherwise get a
KernelSplice, whose bytes Python never sees.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from burrow.exception import RemoteProtocolError
from burrow.net.splice import InspectedSplice, KernelSplice, Splice, join
from burrow.net.stream import Chunk, Stream

WAIT = 10.0


@dataclass
class Peer:
    """The far end of one of the splice's streams."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def read(self, n: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), WAIT)

    async def eof(self) -> bytes:
        return await asyncio.wait_for(self.reader.read(), WAIT)


@asynccontextmanager
async def stream_and_peer() -> AsyncIterator[tuple[Stream, Peer]]:
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[Stream] = loop.create_future()
    server = await loop.create_server(
        lambda: Stream(on_connected=accepted.set_result), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    stream = await asyncio.wait_for(accepted, WAIT)
    try:
        yield stream, Peer(reader, writer)
    finally:
        writer.close()
        stream.abort()
        server.close()


class Shouting:
    """Changes what crosses in both directions, and answers each visitor chunk."""

    def from_visitor(self, data: Chunk) -> Chunk:
        return bytes(data).upper()

    def to_visitor(self, data: Chunk) -> Chunk:
        return b"<" + bytes(data) + b">"

    def replies(self) -> bytes:
        return b"!"


class Refusing(Shouting):
    def from_visitor(self, data: Chunk) -> Chunk:
        raise RemoteProtocolError("not HTTP/2")


async def test_without_an_inspector_plain_streams_get_the_kernel_splice() -> None:
    async with stream_and_peer() as (a, _), stream_and_peer() as (b, _):
        assert KernelSplice.possible(a, b)
        splice = join(a, b)
        assert isinstance(splice, KernelSplice)
        splice.close()


async def test_bytes_pass_through_the_inspector_never_the_kernel() -> None:
    async with stream_and_peer() as (a, visitor), stream_and_peer() as (b, server):
        assert KernelSplice.possible(a, b)
        splice = join(a, b, inspector=Shouting())
        assert type(splice) is InspectedSplice
        splice.start()
        visitor.writer.write(b"abc")
        assert await server.read(3) == b"ABC"
        assert await visitor.read(1) == b"!"
        server.writer.write(b"xy")
        assert await visitor.read(4) == b"<xy>"
        assert (splice.bytes_a_to_b, splice.bytes_b_to_a) == (3, 2)
        # Half-close and close pass as through any splice.
        visitor.writer.write_eof()
        assert await server.eof() == b""
        server.writer.write_eof()
        assert await visitor.eof() == b""
        assert splice.done


async def test_a_protocol_error_ends_the_splice_and_forwards_nothing() -> None:
    ended: list[Splice] = []
    async with stream_and_peer() as (a, visitor), stream_and_peer() as (b, server):
        splice = join(a, b, inspector=Refusing(), on_done=ended.append)
        splice.start()
        visitor.writer.write(b"GET / HTTP/1.1\r\n\r\n")
        assert await server.eof() == b""
        assert await visitor.eof() == b""
        assert ended == [splice]
