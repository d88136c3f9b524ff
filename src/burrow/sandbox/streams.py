"""A sandbox's stdout and stderr, and how the sandbox's calls reach the agent loop.

Output is pumped from the pipes on the agent loop into a bounded buffer;
readers in plain threads or in another event loop wait on it from there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, Concatenate, Final, ParamSpec, TypeVar

from burrow._aio import dual_method
from burrow.agent.client import runtime

log = logging.getLogger("burrow.sandbox")

P = ParamSpec("P")
T = TypeVar("T")
S = TypeVar("S")

# Output kept per stream for read(): a sandbox nobody reads must neither
# block on a full pipe nor grow without bound, so the oldest bytes go first.
MAX_BUFFERED_OUTPUT: Final = 16 * 1024 * 1024
READ_CHUNK: Final = 64 * 1024


def on_agent_loop(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on the agent loop and wait for it (from a plain thread)."""
    return runtime.run(coro)


def on_agent_loop_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on the agent loop; the caller's loop awaits the result."""
    return asyncio.wrap_future(runtime.submit(coro))


def agent_loop_method(
    fn: Callable[Concatenate[S, P], Coroutine[Any, Any, T]],
) -> dual_method[S, P, T]:
    """A coroutine method that runs on the agent loop: ``m()`` blocks, ``await m.aio()`` not."""
    return dual_method(fn, on_agent_loop, on_agent_loop_async)


class SandboxStream:
    """The stdout or stderr of a sandbox.

    ``read()`` waits for the end and returns all text not read yet;
    ``for line in sb.stdout`` gives lines as they come (``async for`` too).
    ``await sb.stdout.read.aio()`` is the async ``read()``.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._buffer = bytearray()
        self._eof = False
        self._changed: asyncio.Event | None = None  # made on the agent loop
        self.dropped = 0
        """Bytes dropped unread because more than ``MAX_BUFFERED_OUTPUT`` was waiting."""

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _feed(self, data: bytes) -> None:
        self._buffer += data
        excess = len(self._buffer) - MAX_BUFFERED_OUTPUT
        if excess > 0:
            del self._buffer[:excess]
            self.dropped += excess
        self._event().set()

    def _close(self) -> None:
        self._eof = True
        self._event().set()

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        try:
            while chunk := await reader.read(READ_CHUNK):
                self._feed(chunk)
        except OSError as exc:  # pragma: no cover - a pipe does not fail on Linux
            log.debug("%s: %s", self.name, exc)
        finally:
            self._close()

    async def _read(self) -> str:
        while not self._eof:
            event = self._event()
            event.clear()
            await event.wait()
        data = bytes(self._buffer)
        self._buffer.clear()
        return data.decode(errors="replace")

    read = dual_method(_read, on_agent_loop, on_agent_loop_async)

    async def _readline(self) -> str | None:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0 or (self._eof and self._buffer):
                end = end + 1 if end >= 0 else len(self._buffer)
                line = bytes(self._buffer[:end])
                del self._buffer[:end]
                return line.decode(errors="replace")
            if self._eof:
                return None
            event = self._event()
            event.clear()
            await event.wait()

    def __iter__(self) -> Iterator[str]:
        while (line := on_agent_loop(self._readline())) is not None:
            yield line

    async def __aiter__(self) -> AsyncIterator[str]:
        while (line := await on_agent_loop_async(self._readline())) is not None:
            yield line
