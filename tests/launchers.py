"""``burrow launch ...`` as users run it: a process of its own, behind a real ``burrow dev``.

with launched(relay, tmp_path, ("shell",)) as shell:
    relay.curl(shell.url)           # the URL it printed, with the token
"""

from __future__ import annotations

import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from devrelay import BURROW, DevRelay

START_TIMEOUT = 120  # a first JupyterLab start builds its caches; CI machines are slow


@dataclass
class Launched:
    """A running ``burrow launch`` process and the URL it printed."""

    process: subprocess.Popen[str]
    url: str
    stderr: Path

    @property
    def base(self) -> str:
        """The URL without path and query: ``https://<label>.r1.localhost:<port>``."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 443

    @property
    def token(self) -> str:
        return parse_qs(urlsplit(self.url).query)["token"][0]

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def stop(self, timeout: float = 40) -> int:
        """SIGINT, as Ctrl-C sends; the exit code (SIGKILL and a failure if it hangs)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"burrow launch ignored SIGINT: {self.log()}") from None
        return self.process.returncode


def _first_line(proc: subprocess.Popen[str], stderr: Path, timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if selector.select(left):
                line = proc.stdout.readline()
                if line:
                    return line.strip()
                break  # EOF: the process ended
    proc.kill()
    proc.wait()
    raise AssertionError(f"burrow launch printed no URL: {stderr.read_text(errors='replace')}")


@contextmanager
def launched(
    relay: DevRelay, tmp: Path, args: tuple[str, ...], cwd: Path | None = None
) -> Iterator[Launched]:
    tmp.mkdir(parents=True, exist_ok=True)
    stderr = tmp / "launch.log"
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [*BURROW, "launch", *args],
            env=relay.env(),
            cwd=cwd or tmp,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        yield Launched(proc, _first_line(proc, stderr, START_TIMEOUT), stderr)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


LaunchFactory = Callable[..., AbstractContextManager[Launched]]
