"""StopFlag: how burrow's commands wait, in the main thread, for a signal to stop.

Two traps it avoids. The kernel may deliver a signal to any thread (the
agent's, say), and then nothing interrupts the main thread's blocking wait:
Python runs the handler only when the main thread next runs bytecode. And a
handler must not take a lock: ``threading.Event.set()`` in one deadlocks
when the signal lands while the main thread holds that event's lock in
``wait()``. So the signals go to a pipe (``signal.set_wakeup_fd``: CPython's
C-level handler writes the signal's number there, whichever thread it runs
in), and ``wait()`` selects on the pipe.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from collections.abc import Iterable
from types import FrameType
from typing import Final

STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""The signals that stop a command cleanly. SIGHUP is a closed terminal or a
dropped SSH session: a command killed by it could leave its children running."""

_SET: Final = b"\x00"  # what set() writes; signal numbers are never 0


class StopFlag:
    """Set by a stop signal, or by ``set()`` from any thread; ``wait()`` in the main thread.

    The pipe lives as long as the process: a late ``set()`` must never write
    to a reused descriptor.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._set = False
        self.signal: int | None = None
        """The first signal that set the flag; None if only ``set()`` did."""

    def install(self, signals: Iterable[int] = STOP_SIGNALS) -> None:
        """Make ``signals`` set the flag instead of their default action (main thread only)."""
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for sig in signals:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        pass  # the wakeup fd has the byte already; this only replaces the default action

    def set(self) -> None:
        """Set the flag; safe from a signal handler and from any thread."""
        with contextlib.suppress(BlockingIOError):  # a full pipe is set already
            os.write(self._write, _SET)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds (``None``: for ever) for the flag; whether it is set."""
        if not self._set:
            ready, _, _ = select.select([self._read], [], [], timeout)
            if ready:
                self._set = True
                with contextlib.suppress(BlockingIOError):
                    for byte in os.read(self._read, 512):
                        if byte and self.signal is None:
                            self.signal = byte
        return self._set
