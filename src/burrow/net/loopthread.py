"""An event loop running in a background thread, for code that is not async.

The client library runs its agent on one (``burrow.forward`` works from
plain threads), and so do the demo and the tests' relay harness.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop where uvloop is installed, else asyncio's own."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class LoopThread:
    """One event loop on one daemon thread, started on first use."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, started now if it is not yet (or no longer) running."""
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                loop = new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=run, name=self.name, daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; the result arrives in the future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def in_loop_thread(self) -> bool:
        """Whether the caller is running on this loop's thread."""
        return self._thread is not None and threading.current_thread() is self._thread

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result from another thread."""
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError(f"{self.name}: blocking call from the loop's own thread")
        return self.submit(coro).result(timeout)

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop and close it once it has stopped; waits for the thread."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()
