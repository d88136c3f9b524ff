"""Shared pieces of the benchmarks: a `burrow dev` relay, agents and local servers as processes.

Each burrow process runs on its own so that its RSS and CPU time can be read
from /proc alone; these helpers start them, read their figures, and write
the JSON result the harness collects.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from burrow import tokens
from burrow.relay import dev

CLK_TCK = os.sysconf("SC_CLK_TCK")

# A `burrow dev` start-up generates a CA and a certificate; it takes well under
# a second, but a loaded machine may be slower.
START_TIMEOUT = 30.0


def raise_nofile(soft: int | None = None) -> int:
    """Set this process's open-file limit to ``soft`` (default: as high as the hard limit)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft is None:
        soft = hard if hard != resource.RLIM_INFINITY else 1 << 20
    elif hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def _child_limit(soft: int | None) -> Any:
    def apply() -> None:
        raise_nofile(soft)

    return apply


# -- /proc figures ------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident set size (VmRSS) of a process, in bytes."""
    return _status_kib(pid, "VmRSS:") * 1024


def peak_rss_bytes(pid: int) -> int:
    """Peak resident set size (VmHWM) of a process, in bytes."""
    return _status_kib(pid, "VmHWM:") * 1024


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used, in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def listen_overflows() -> int:
    """TcpExt ListenOverflows of this network namespace: SYNs dropped on a full accept queue."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:"):
            counters = dict(zip(head.split()[1:], values.split()[1:], strict=False))
            return int(counters.get("ListenOverflows", 0))
    return 0


class Peaks:
    """Highest open-file count of some processes, sampled in the background."""

    INTERVAL = 0.05

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.fds = dict.fromkeys(pids, 0)

    def sample(self) -> None:
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError):
                self.fds[name] = max(self.fds[name], open_fds(pid))

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.INTERVAL)


@dataclass
class Snapshot:
    rss: int
    cpu: float

    @classmethod
    def of(cls, pid: int) -> Snapshot:
        return cls(rss=rss_bytes(pid), cpu=cpu_seconds(pid))


def mib(n: float) -> float:
    return round(n / (1024 * 1024), 1)


# -- statistics -----------------------------------------------------------------


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


# -- processes ------------------------------------------------------------------


class Processes:
    """Child processes that are stopped, in reverse order, when the block ends."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._children: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        nofile: int | None = None,
        stdin: bool = False,
    ) -> subprocess.Popen[bytes]:
        log = self.workdir / f"{len(self._children)}-{name}.log"
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log.open("wb"),
            env={**os.environ, **(env or {})},
            preexec_fn=_child_limit(nofile),
        )
        self._children.append((proc, log))
        return proc

    def log_of(self, proc: subprocess.Popen[bytes]) -> str:
        for child, log in self._children:
            if child is proc:
                return log.read_text(errors="replace")
        return ""

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        for proc, _ in reversed(self._children):
            self.stop(proc)


@dataclass
class Relay:
    """A running `burrow dev` process and the settings it wrote."""

    proc: subprocess.Popen[bytes]
    state_dir: Path
    env: dict[str, str]
    port: int
    ca: str
    signing_key: Path = field(repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def mint(self, subject: str = "bench") -> str:
        key = tokens.read_signing_key(self.signing_key)
        return tokens.mint(key, subject=subject, ttl_seconds=3600)


def start_relay(
    procs: Processes, name: str = "relay", *, nofile: int | None = None, extra: tuple[str, ...] = ()
) -> Relay:
    """``burrow dev --port 0 [extra]`` in a fresh state dir; returns once it has written
    its settings."""
    state = procs.workdir / f"{name}-state"
    env_file = procs.workdir / f"{name}.env"
    env_file.unlink(missing_ok=True)  # it appears once the relay listens
    argv = [sys.executable, "-m", "burrow", "dev", "--port", "0"]
    argv += ["--state-dir", str(state), "--env-file", str(env_file), "--log-level", "warning"]
    proc = procs.start(name, [*argv, *extra], nofile=nofile)
    deadline = time.monotonic() + START_TIMEOUT
    while not env_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"burrow dev exited: {procs.log_of(proc)}")
        if time.monotonic() > deadline:
            raise RuntimeError("burrow dev did not start in time")
        time.sleep(0.02)
    env = dev.parse_env(env_file.read_text())
    port = int(env["BURROW_RELAY"].rpartition(":")[2])
    return Relay(
        proc=proc,
        state_dir=state,
        env={**env, dev.ENV_STATE_DIR: str(state)},
        port=port,
        ca=env["BURROW_CA"],
        signing_key=state / dev.SIGNING_KEY_FILE,
    )


# A local server for tunnels to lead to: "http" answers every request with a
# 200 and keeps the connection open; "echo" sends back what it gets.
LOCAL_SERVER = r"""
import asyncio, sys
mode = sys.argv[1]
REPLY = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok"

class Local(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buffer = b""
    def data_received(self, data):
        if mode == "echo":
            self.transport.write(data)
            return
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
            self.transport.write(REPLY)
    def eof_received(self):
        return False

async def main():
    server = await asyncio.get_running_loop().create_server(
        Local, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()

try:
    import uvloop
    uvloop.run(main())
except ImportError:
    asyncio.run(main())
"""


def start_local_server(procs: Processes, mode: str, *, nofile: int | None = None) -> int:
    """A local HTTP or echo server in its own process; returns its port."""
    proc = procs.start(f"local-{mode}", [sys.executable, "-c", LOCAL_SERVER, mode], nofile=nofile)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"local server did not start: {procs.log_of(proc)}")
    return int(line)


# An agent process: burrow.forward() of one port, until its stdin closes.
AGENT = r"""
import json, sys
import burrow
port, tcp = int(sys.argv[1]), sys.argv[2] == "1"
with burrow.forward(port, unencrypted=tcp) as t:
    print(json.dumps({"host": t.host, "port": t.port,
                      "tcp_host": t.unencrypted_host, "tcp_port": t.unencrypted_port}),
          flush=True)
    sys.stdin.read()
"""


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    tunnel: dict[str, Any]

    @property
    def pid(self) -> int:
        return self.proc.pid


def start_agent(
    procs: Processes, relay: Relay, port: int, *, tcp: bool, nofile: int | None = None
) -> Agent:
    """A separate process forwarding ``port`` through ``relay``."""
    proc = procs.start(
        "agent",
        [sys.executable, "-c", AGENT, str(port), "1" if tcp else "0"],
        env=relay.env,
        nofile=nofile,
        stdin=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"agent did not start: {procs.log_of(proc)}")
    return Agent(proc=proc, tunnel=json.loads(line))


@contextlib.contextmanager
def processes() -> Iterator[Processes]:
    with tempfile.TemporaryDirectory(prefix="burrow-bench-") as tmp:
        procs = Processes(Path(tmp))
        try:
            yield procs
        finally:
            procs.close()


def count_emfile(text: str) -> int:
    return text.count("Too many open files") + text.count("EMFILE")


# -- command line and result ----------------------------------------------------


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", type=Path, required=True, help="Where to write the result.")
    parser.add_argument(
        "--budget", type=float, default=120.0, help="Seconds the whole run may take."
    )
    return parser.parse_args()


class Budget:
    """Wall-clock allowance of a run, with a margin kept back for shutting down."""

    def __init__(self, seconds: float, reserve: float = 8.0) -> None:
        self.start = time.monotonic()
        self.end = self.start + max(1.0, seconds - reserve)

    def left(self) -> float:
        return self.end - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def share(self, fraction: float) -> float:
        """Absolute monotonic deadline for a phase given ``fraction`` of the time left."""
        return time.monotonic() + max(0.0, self.left()) * fraction


def write_result(path: Path, title: str, tables: list[dict[str, Any]], notes: list[str]) -> None:
    result = {"title": title, "tables": tables, "notes": notes}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def emit(path: Path | None, title: str, tables: list[dict[str, Any]], notes: list[str]) -> None:
    """The result: as JSON to ``path`` (bench/run.py's --json), else as Markdown on stdout."""
    if path is not None:
        write_result(path, title, tables, notes)
        return
    import report

    print(f"# {title}\n")
    for one in tables:
        print(report.markdown_table(one) + "\n")
    print("\n".join(f"- {note}" for note in notes))


def table(caption: str, columns: list[str], rows: list[list[Any]]) -> dict[str, Any]:
    return {"caption": caption, "columns": columns, "rows": rows}
