"""Stream's read scheduling on uvloop, as the relay and the agent run it.

One busy stream must not hold the event loop: libuv reads a ready socket up
to 32 times in a row, and under 64 bulk transfers that made one turn of the
loop last over a second, long enough for new visitors to wait out their
10 s for a data connection. A stream that fills its buffer yields after
READ_TURN_BUDGET bytes, and a consumer's pause (back-pressure) survives it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections import Counter
from collections.abc import Callable

import uvloop

from burrow.net.stream import READ_SIZE, READ_TURN_BUDGET, Chunk, Stream

MIB = 1024 * 1024


class Recorder:
    """A receiver that notes, for every chunk, which turn of the loop it arrived in."""

    def __init__(self, turn: Callable[[], int]) -> None:
        self.turn = turn
        self.reads: list[tuple[int, int]] = []  # (turn, size)
        self.total = 0
        self.eof = asyncio.Event()
        self.on_chunk: Callable[[Stream], None] | None = None

    def on_data(self, stream: Stream, data: Chunk) -> None:
        self.reads.append((self.turn(), len(data)))
        self.total += len(data)
        if self.on_chunk is not None:
            self.on_chunk(stream)

    def on_eof(self, stream: Stream) -> None:
        self.eof.set()

    def on_close(self, stream: Stream, exc: BaseException | None) -> None:
        self.eof.set()

    def on_pause_writing(self, stream: Stream) -> None:
        pass

    def on_resume_writing(self, stream: Stream) -> None:
        pass


def _feed(sock: socket.socket, size: int) -> threading.Thread:
    """Write ``size`` bytes into ``sock`` from a thread, then half-close."""

    def run() -> None:
        block = b"x" * MIB
        left = size
        while left:
            left -= sock.send(block[: min(left, MIB)])
        sock.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


async def _stream_over_socketpair(
    turn: Callable[[], int],
) -> tuple[Stream, Recorder, socket.socket]:
    ours, theirs = socket.socketpair()
    for sock in (ours, theirs):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * MIB)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 * MIB)
    loop = asyncio.get_running_loop()
    _, stream = await loop.connect_accepted_socket(Stream, ours)
    recorder = Recorder(turn)
    stream.set_receiver(recorder)
    return stream, recorder, theirs


def _run(main: Callable[[], object]) -> None:
    uvloop.run(main())  # type: ignore[arg-type]


def test_a_bulk_stream_yields_the_loop_after_its_budget() -> None:
    """With megabytes waiting in the socket, no turn of the loop reads more than the budget."""

    async def main() -> None:
        turns = 0

        def tick() -> None:
            nonlocal turns
            turns += 1
            if not recorder.eof.is_set():
                loop.call_soon(tick)

        loop = asyncio.get_running_loop()
        stream, recorder, theirs = await _stream_over_socketpair(lambda: turns)
        stream.pause_reading()
        writer = _feed(theirs, 64 * MIB)
        await asyncio.sleep(0.2)  # megabytes pile up in the kernel
        loop.call_soon(tick)
        stream.resume_reading()
        await asyncio.wait_for(recorder.eof.wait(), 60)
        writer.join(10)
        theirs.close()
        assert recorder.total == 64 * MIB
        per_turn = Counter[int]()
        for turn, size in recorder.reads:
            per_turn[turn] += size
        full_reads = sum(1 for _, size in recorder.reads if size == READ_SIZE)
        assert full_reads > 32, "the test never made the loop read whole buffers in a row"
        assert max(per_turn.values()) <= READ_TURN_BUDGET, per_turn.most_common(3)

    _run(main)


def test_a_pause_during_a_yield_holds() -> None:
    """Back-pressure set while the stream has yielded is still in force when its turn ends."""

    async def main() -> None:
        stream, recorder, theirs = await _stream_over_socketpair(lambda: 0)
        stream.pause_reading()
        writer = _feed(theirs, 32 * MIB)
        await asyncio.sleep(0.2)

        def pause_once_yielded(s: Stream) -> None:
            if recorder.total >= READ_TURN_BUDGET:
                recorder.on_chunk = None
                s.pause_reading()

        recorder.on_chunk = pause_once_yielded
        stream.resume_reading()
        await asyncio.sleep(0.5)
        held = recorder.total
        assert READ_TURN_BUDGET <= held < 32 * MIB
        await asyncio.sleep(0.5)  # many turns later: still paused
        assert recorder.total == held
        stream.resume_reading()
        await asyncio.wait_for(recorder.eof.wait(), 60)
        writer.join(10)
        theirs.close()
        assert recorder.total == 32 * MIB

    _run(main)
