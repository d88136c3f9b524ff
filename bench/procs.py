"""Child processes for the benchmark: each in its own process group, always stopped.

Also the two small things every setup needs: a free loopback port and a wait
until something listens on it, and the CPU time a process tree has used.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

HOST = "127.0.0.1"

# How long a server or tunnel may take to start listening before we give up.
START_TIMEOUT = 20.0
# How long a stopped process group gets between SIGTERM and SIGKILL.
STOP_GRACE = 3.0


class BenchError(Exception):
    """A setup that could not be started or a measurement that could not be made."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def spawn(
    argv: Sequence[str],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    stdout: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session (so its whole group can be killed); stderr to ``log``."""
    full_env = {**os.environ, **env} if env is not None else None
    with log.open("ab") as err:
        out = stdout.open("wb") if stdout is not None else err
        try:
            return subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=full_env,
                start_new_session=True,
            )
        finally:
            if stdout is not None:
                out.close()


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, then SIGKILL it if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; children that outlived it get the same signal.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return


@contextlib.contextmanager
def running(
    argv: Sequence[str],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    stdout: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    proc = spawn(argv, log, env=env, stdout=stdout)
    try:
        yield proc
    finally:
        stop(proc)


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    """Return once ``127.0.0.1:port`` accepts a connection; fail if ``proc`` exits first."""
    deadline = time.monotonic() + START_TIMEOUT
    delay = 0.005
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}: {tail(log)}")
        try:
            with socket.create_connection((HOST, port), timeout=1.0):
                return
        except OSError:
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
    raise BenchError(f"{what} did not listen on {HOST}:{port} within {START_TIMEOUT}s")


def wait_for(
    condition: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, what: str
) -> None:
    """Poll ``condition()`` until it is true; fail if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}: {tail(log)}")
        time.sleep(0.02)
    raise BenchError(f"{what} was not ready within {START_TIMEOUT}s: {tail(log)}")


def tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return " | ".join(text.strip().splitlines()[-lines:]) or "(empty log)"


def run(argv: Sequence[str], timeout: float) -> str:
    """Run a client to completion and return its stdout; any failure is a BenchError."""
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{argv[0]} took longer than {timeout:.0f}s") from None
    except OSError as exc:
        raise BenchError(f"cannot run {argv[0]}: {exc}") from exc
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise BenchError(f"{argv[0]} exited with {done.returncode}: {' | '.join(detail)}")
    return done.stdout


# -- CPU accounting -----------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds incl. waited-for children) of ``pid``, None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after it.
    fields = raw[raw.rindex(")") + 2 :].split()
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return ppid, (utime + stime + cutime + cstime) / _TICK


def children(pid: int) -> list[int]:
    """Live child processes of ``pid``."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def cpu_seconds(roots: Sequence[int]) -> float:
    """CPU time used so far by ``roots`` and every live descendant of theirs."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            found = _stat(int(entry))
            if found is not None:
                stats[int(entry)] = found
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total = 0.0
    todo = [pid for pid in roots if pid in stats]
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += stats[pid][1]
        todo.extend(children.get(pid, []))
    return total
