"""The programs of ``examples/``, run as users run them, for the tests in tests/e2e/examples.

An example runs in a session (process group) of its own, so that stopping it
also stops what it started: uvicorn's worker, sshd.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from devrelay import DevRelay

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
STARTUP_TIMEOUT = 60.0  # seconds an example may take to print its address (a loaded CI box)
STOP_TIMEOUT = 15.0


class Example:
    """A running example: its stdout lines as they come, its stderr in a file."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.argv = argv
        self.log = log
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        with log.open("wb") as stderr:
            self.proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                start_new_session=True,
            )
        threading.Thread(target=self._read, name="example-stdout", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_line(self, pattern: str, timeout: float = STARTUP_TIMEOUT) -> re.Match[str]:
        """The first line of stdout, from here on, that ``pattern`` matches."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{self.argv} printed no line matching {pattern!r} in {timeout:g} s; "
                    f"stdout: {self.lines}\nstderr:\n{self.stderr()}"
                )
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(
                    f"{self.argv} ended with exit code {self.proc.wait()} before printing a "
                    f"line matching {pattern!r}; stdout: {self.lines}\nstderr:\n{self.stderr()}"
                )
            self.lines.append(line)
            if match := re.search(pattern, line):
                return match

    def wait_for_stderr(self, text: str, timeout: float = STARTUP_TIMEOUT) -> None:
        """Wait until ``text`` shows in the example's stderr (a server's "listening" line)."""
        deadline = time.monotonic() + timeout
        while text not in self.stderr():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.argv} wrote no {text!r} to stderr in {timeout:g} s "
                    f"(exit code {self.proc.poll()}); stderr:\n{self.stderr()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Ctrl-C to the example's whole process group, then SIGKILL to what is left."""
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # its children, if any outlived it
        if self.proc.stdout is not None:
            self.proc.stdout.close()


StartExample = Callable[..., Example]


def fetch_when_up(
    dev: DevRelay, url: str, example: Example, *args: str, timeout: float = STARTUP_TIMEOUT
) -> str:
    """``curl --fail ARGS URL``'s body, retried while the example's server is starting.

    An example prints its URL before its server listens; the tunnel closes
    visitors that come too early, and curl reports an empty reply.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = dev.curl(url, "--fail", *args)
        if result.returncode == 0:
            return result.stdout
        if example.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(
                f"{url} did not answer: {result.stderr.strip()}\n"
                f"example stderr:\n{example.stderr()}"
            )
        time.sleep(0.1)
