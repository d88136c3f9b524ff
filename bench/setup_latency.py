"""Tunnel set-up latency: from ``burrow.forward()`` to the first successful request.

Three cases against a `burrow dev` relay in its own process, with a local
HTTP server in another: a live session (the process already forwarded once),
a cold session (new token, so a new session per tunnel), and a new process
(with a private CA and with a system-size CA bundle; `import burrow` against
a bare interpreter; `burrow forward PORT` against `ssh -N -R`, side by side).
Each request is one HTTPS GET on a fresh TLS connection through the relay.

Alone: ``python bench/setup_latency.py`` prints Markdown tables (``--budget``
seconds, 90 by default); ``bench/run.py`` runs it for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import _relayproc as rp
import anchors
from procs import free_port

import burrow
from burrow.agent import client as agent_client

TITLE = "Tunnel set-up: forward() to the first successful request"

SAMPLES = 200
WARMUP = 5
FRESH_SAMPLES = 40

# Issue 3's targets for the median, in milliseconds.
TARGET_LIVE_MS = 5.0
TARGET_COLD_MS = 50.0

# A visitor that does not get a 200 tries again this many times; the relay
# routes a tunnel before it answers `opened`, so one attempt should always do.
MAX_ATTEMPTS = 20
REQUEST_TIMEOUT = 5.0


def https_status(ctx: ssl.SSLContext, relay_port: int, host: str) -> int:
    """Status of one GET on a new TLS connection to the relay, SNI = the tunnel's name."""
    with socket.create_connection(("127.0.0.1", relay_port), timeout=REQUEST_TIMEOUT) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with ctx.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nhost: {host}\r\n\r\n".encode())
            head = b""
            while b"\r\n" not in head:
                chunk = tls.recv(4096)
                if not chunk:
                    return 0
                head += chunk
    return int(head.split(b" ", 2)[1])


def first_success(ctx: ssl.SSLContext, relay_port: int, host: str) -> int:
    """Requests until one returns 200; how many it took (MAX_ATTEMPTS + 1 if none did)."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            if https_status(ctx, relay_port, host) == 200:
                return attempt
        except (OSError, ValueError, IndexError):
            pass
    return MAX_ATTEMPTS + 1


class Samples:
    def __init__(self) -> None:
        self.total: list[float] = []
        self.enter: list[float] = []
        self.exit: list[float] = []
        self.retries = 0
        self.failures = 0

    def row(self, case: str, values: list[float], target_ms: float | None) -> list[Any]:
        if not values:
            return [case, 0, "-", "-", "-", "-", "-", "-"]
        p50 = rp.ms(rp.percentile(values, 50))
        target: Any = "-"
        met: Any = "-"
        if target_ms is not None:
            target = f"<= {target_ms:g}"
            met = "yes" if p50 <= target_ms else "no"
        return [
            case,
            len(values),
            p50,
            rp.ms(rp.percentile(values, 90)),
            rp.ms(rp.percentile(values, 99)),
            rp.ms(max(values)),
            target,
            met,
        ]


def timed_forward(
    port: int, client: burrow.Client, ctx: ssl.SSLContext, samples: Samples
) -> burrow.forward:
    """One tunnel: forward(), first 200, leave the block; records the three times."""
    t0 = time.perf_counter()
    handle = burrow.forward(port, client=client)
    with handle as tunnel:
        t_enter = time.perf_counter()
        attempts = first_success(ctx, tunnel.port, tunnel.host)
        t_first = time.perf_counter()
    t_exit = time.perf_counter()
    if attempts > MAX_ATTEMPTS:
        samples.failures += 1
    else:
        samples.retries += attempts - 1
        samples.total.append(t_first - t0)
    samples.enter.append(t_enter - t0)
    samples.exit.append(t_exit - t_first)
    return handle


def run_loop(deadline: float, count: int, body: Callable[[int], None]) -> None:
    for i in range(count):
        if time.monotonic() > deadline:
            return
        body(i)


def live(relay: rp.Relay, port: int, ctx: ssl.SSLContext, deadline: float) -> Samples:
    env = relay.env
    client = burrow.Client(relay=env["BURROW_RELAY"], token=env["BURROW_TOKEN"], ca=relay.ca)
    warm = Samples()
    for _ in range(WARMUP):  # brings the session up and the pool to its size
        timed_forward(port, client, ctx, warm)
    samples = Samples()
    run_loop(deadline, SAMPLES, lambda _: timed_forward(port, client, ctx, samples))
    return samples


async def _drop_session(settings: Any) -> None:
    # The runtime keeps one session per settings for the life of the process;
    # a benchmark that makes 200 of them closes each after use (private API).
    session = agent_client.runtime._sessions.pop(settings, None)
    agent_client.runtime._session_locks.pop(settings, None)
    if session is not None:
        await session.close()


def cold(relay: rp.Relay, port: int, ctx: ssl.SSLContext, deadline: float) -> Samples:
    samples = Samples()

    def one(i: int) -> None:
        # A new token makes new settings, so the runtime has to open a new
        # session: TLS handshake, hello/welcome (token check), then open.
        token = relay.mint(f"cold-{i}")
        client = burrow.Client(relay=relay.env["BURROW_RELAY"], token=token, ca=relay.ca)
        handle = timed_forward(port, client, ctx, samples)
        agent_client.runtime.run(_drop_session(handle.config))

    run_loop(deadline, SAMPLES, one)
    return samples


# -- a new process --------------------------------------------------------------

# Issue 9's targets, in milliseconds.
TARGET_IMPORT_MS = 40.0  # `import burrow` over a bare `python -c pass`
TARGET_FRESH_ENTER_P50_MS = 10.0
TARGET_FRESH_ENTER_P99_MS = 20.0
TARGET_FRESH_FIRST_200_MS = 60.0

# Each new process is bounded: one that has not shown its tunnel by then failed.
CHILD_TIMEOUT = 15.0

# The workload: import burrow, forward, report, then hold the tunnel until
# stdin closes. It imports nothing of the benchmark's, so that what it times
# is burrow's own cost; the clocks are CLOCK_MONOTONIC, shared with the parent.
FRESH_CHILD = r"""
import time
started = time.monotonic()
import burrow
imported = time.monotonic()
import json, sys
with burrow.forward(int(sys.argv[1])) as tunnel:
    entered = time.monotonic()
    cpu = time.process_time()  # every thread's, interpreter start-up included
    print(json.dumps({"host": tunnel.host, "port": tunnel.port, "started": started,
                      "imported": imported, "entered": entered, "cpu": cpu}), flush=True)
    sys.stdin.read()
"""


def child_env(base: dict[str, str], pycache: Path) -> dict[str, str]:
    """The environment of a measured process: installed-package conditions.

    Byte code is cached (in the run's own directory, warmed before timing),
    as it is for an installed package: PYTHONDONTWRITEBYTECODE in the
    caller's environment would otherwise recompile burrow in every process.
    """
    env = {**os.environ, **base, "PYTHONPYCACHEPREFIX": str(pycache)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def system_size_bundle(relay: rp.Relay, out: Path) -> Path | None:
    """The system's CA bundle plus the dev CA, for a relay trusted like a public one."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and Path(candidate).is_file():
            out.write_bytes(Path(candidate).read_bytes() + Path(relay.ca).read_bytes())
            return out
    return None


class Fresh:
    """New-process samples of one case."""

    def __init__(self) -> None:
        self.first_200: list[float] = []
        self.enter: list[float] = []
        self.imported: list[float] = []
        self.cpu: list[float] = []
        self.failures = 0
        self.retries = 0


def fresh_sample(
    argv: list[str], env: dict[str, str], relay_port: int, ctx: ssl.SSLContext, out: Fresh
) -> None:
    """Start a process that forwards a port; time it until a visitor's first 200."""
    time.sleep(SETTLE)
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            out.failures += 1
            return
        if line.startswith(b"{"):
            shown = json.loads(line)
            host, port = shown["host"], relay_port
        else:  # `burrow forward` prints the URL
            shown = None
            host, port = urlsplit(line.decode().strip()).hostname or "", relay_port
        attempts = first_success(ctx, port, host)
        done = time.monotonic()
        if attempts > MAX_ATTEMPTS:
            out.failures += 1
            return
        out.retries += attempts - 1
        out.first_200.append(done - started)
        if shown is not None:
            out.imported.append(shown["imported"] - shown["started"])
            out.enter.append(shown["entered"] - shown["imported"])
            out.cpu.append(shown["cpu"])
    finally:
        stop_child(proc)


def ssh_sample(server: Any, local_port: int, out: Fresh) -> None:
    """Start ``ssh -N -R`` for the local server; time it until the first 200 through it."""
    remote = free_port()
    argv = server.reverse_argv([(remote, local_port)])
    time.sleep(SETTLE)
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = started + CHILD_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if http_status(remote) == 200:
                    out.first_200.append(time.monotonic() - started)
                    return
            except (OSError, ValueError, IndexError):
                time.sleep(0.0005)  # not listening yet: sshd binds once ssh asks
        out.failures += 1
    finally:
        stop_child(proc)


def http_status(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
        head = b""
        while b"\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk:
                return 0
            head += chunk
    return int(head.split(b" ", 2)[1])


def stop_child(proc: subprocess.Popen[bytes]) -> None:
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


# A process that prints the time once it is ready: bare, or with burrow imported.
READY_BARE = "import time; print(time.monotonic())"
READY_IMPORTED = "import time; import burrow; print(time.monotonic())"
# The floor under any asyncio client: what `import asyncio` alone costs.
READY_ASYNCIO = "import time; import asyncio; print(time.monotonic())"

# Between two samples: the processes of the last one (a relay session, an sshd
# child) finish tearing down before the next is timed.
SETTLE = 0.05


def wall(argv: list[str], env: dict[str, str]) -> float:
    """Seconds from starting ``argv`` to the time it prints (its work done, before its exit)."""
    time.sleep(SETTLE)
    started = time.monotonic()
    out = subprocess.run(
        argv, env=env, check=True, timeout=CHILD_TIMEOUT, capture_output=True, text=True
    )
    return float(out.stdout.split()[-1]) - started


def burrow_command() -> list[str]:
    """The installed ``burrow`` script, as a user runs it (else ``python -m burrow``)."""
    script = Path(sys.executable).parent / "burrow"
    return [str(script)] if script.exists() else [sys.executable, "-m", "burrow"]


class NewProcess:
    """Every new-process figure, its samples interleaved round by round so that
    a busy spell of the machine spreads over all of them."""

    def __init__(self) -> None:
        self.bare: list[float] = []
        self.imports: list[float] = []
        self.asyncio: list[float] = []
        self.private = Fresh()
        self.bundle = Fresh()
        self.cli = Fresh()
        self.ssh = Fresh()
        self.rounds = 0
        self.bundle_file: Path | None = None
        self.ssh_problem: str | None = None


def new_process(
    relay: rp.Relay, port: int, ctx: ssl.SSLContext, workdir: Path, deadline: float
) -> NewProcess:
    result = NewProcess()
    pycache = workdir / "pycache"
    private_env = child_env(relay.env, pycache)
    bundle = system_size_bundle(relay, workdir / "system-size-bundle.pem")
    result.bundle_file = bundle
    bundle_env: dict[str, str] | None = None
    if bundle is not None:
        bundle_env = child_env({k: v for k, v in relay.env.items() if k != "BURROW_CA"}, pycache)
        bundle_env.pop("BURROW_CA", None)
        bundle_env["SSL_CERT_FILE"] = str(bundle)
    python = [sys.executable, "-c"]
    child = [*python, FRESH_CHILD, str(port)]
    cli = [*burrow_command(), "forward", str(port)]
    # Warm-up, not timed: writes the byte code cache, fills the page cache.
    wall([*python, READY_IMPORTED], private_env)
    subprocess.run([*burrow_command(), "--help"], env=private_env, capture_output=True, check=True)
    fresh_sample(child, private_env, relay.port, ctx, Fresh())
    with contextlib.ExitStack() as stack:
        server: Any = None
        try:
            server = stack.enter_context(anchors.sshd(workdir / "ssh"))
        except Exception as exc:  # no sshd here: the comparison is left out, and said so
            result.ssh_problem = f"{type(exc).__name__}: {exc}"
        for _ in range(FRESH_SAMPLES):
            if time.monotonic() > deadline:
                break
            result.bare.append(wall([*python, READY_BARE], private_env))
            result.imports.append(wall([*python, READY_IMPORTED], private_env))
            result.asyncio.append(wall([*python, READY_ASYNCIO], private_env))
            fresh_sample(child, private_env, relay.port, ctx, result.private)
            if bundle_env is not None:
                fresh_sample(child, bundle_env, relay.port, ctx, result.bundle)
            fresh_sample(cli, private_env, relay.port, ctx, result.cli)
            if server is not None:
                ssh_sample(server, port, result.ssh)
            result.rounds += 1
    return result


def _met(values: list[float], p50_ms: float | None, p99_ms: float | None) -> str:
    if not values:
        return "-"
    ok = p50_ms is None or rp.percentile(values, 50) * 1000 <= p50_ms
    ok = ok and (p99_ms is None or rp.percentile(values, 99) * 1000 <= p99_ms)
    return "yes" if ok else "**no**"


def new_process_rows(np: NewProcess) -> list[list[Any]]:
    def row(case: str, values: list[float], p50: float | None, p99: float | None) -> list[Any]:
        target = " and ".join(
            f"{name} <= {goal:g}" for name, goal in (("p50", p50), ("p99", p99)) if goal
        )
        if not values:
            return [case, 0, "-", "-", "-", "-", target or "-", "-"]
        return [
            case,
            len(values),
            rp.ms(rp.percentile(values, 50)),
            rp.ms(rp.percentile(values, 90)),
            rp.ms(rp.percentile(values, 99)),
            rp.ms(max(values)),
            target or "-",
            _met(values, p50, p99) if target else "-",
        ]

    return [
        row("bare `python -c`: process start to ready", np.bare, None, None),
        row("`python -c 'import burrow'`: process start to imported", np.imports, None, None),
        row(
            "`python -c 'import asyncio'` (the floor): process start to imported",
            np.asyncio,
            None,
            None,
        ),
        row(
            "private CA (BURROW_CA): import burrow, inside the process",
            np.private.imported,
            None,
            None,
        ),
        row(
            "private CA (BURROW_CA): forward() enter",
            np.private.enter,
            TARGET_FRESH_ENTER_P50_MS,
            TARGET_FRESH_ENTER_P99_MS,
        ),
        row(
            "private CA (BURROW_CA): process start to first 200",
            np.private.first_200,
            TARGET_FRESH_FIRST_200_MS,
            None,
        ),
        row(
            "system-size bundle (SSL_CERT_FILE): import burrow, inside",
            np.bundle.imported,
            None,
            None,
        ),
        row(
            "system-size bundle (SSL_CERT_FILE): forward() enter",
            np.bundle.enter,
            TARGET_FRESH_ENTER_P50_MS,
            TARGET_FRESH_ENTER_P99_MS,
        ),
        row(
            "system-size bundle (SSL_CERT_FILE): process start to first 200",
            np.bundle.first_200,
            TARGET_FRESH_FIRST_200_MS,
            None,
        ),
        row(
            "private CA: CPU time of the process until forward() returned",
            np.private.cpu,
            None,
            None,
        ),
        row(
            "system-size bundle: CPU time of the process until forward() returned",
            np.bundle.cpu,
            None,
            None,
        ),
        row("`burrow forward PORT`: process start to first 200", np.cli.first_200, None, None),
        row("`ssh -N -R`: process start to first 200", np.ssh.first_200, None, None),
    ]


def median_ms(values: list[float]) -> float | None:
    return rp.ms(statistics.median(values)) if values else None


def new_process_targets(np: NewProcess) -> list[list[Any]]:
    """Issue 9's new-process targets: what was measured against each, from medians."""

    def verdict(ok: bool | None) -> str:
        return "-" if ok is None else ("yes" if ok else "**no**")

    bare, imported = median_ms(np.bare), median_ms(np.imports)
    added = None if bare is None or imported is None else round(imported - bare, 2)
    floor = median_ms(np.asyncio)
    floor_added = None if bare is None or floor is None else round(floor - bare, 2)
    cli, ssh = median_ms(np.cli.first_200), median_ms(np.ssh.first_200)
    ratio = None if cli is None or not ssh else round(cli / ssh, 2)
    rows: list[list[Any]] = [
        [
            "`import burrow` over a bare `python -c` (medians, process start to ready)",
            f"<= {TARGET_IMPORT_MS:g} ms",
            "-"
            if added is None
            else f"+{added} ms"
            + ("" if floor_added is None else f" (`import asyncio` alone: +{floor_added} ms)"),
            verdict(None if added is None else added <= TARGET_IMPORT_MS),
        ]
    ]
    for name, fresh in (("private CA", np.private), ("system-size bundle", np.bundle)):
        for label, q, goal in (
            ("p50", 50, TARGET_FRESH_ENTER_P50_MS),
            ("p99", 99, TARGET_FRESH_ENTER_P99_MS),
        ):
            value = rp.ms(rp.percentile(fresh.enter, q)) if fresh.enter else None
            rows.append(
                [
                    f"forward() in a new process, {name}, {label}",
                    f"<= {goal:g} ms",
                    "-" if value is None else f"{value} ms",
                    verdict(None if value is None else value <= goal),
                ]
            )
        value = rp.ms(rp.percentile(fresh.first_200, 50)) if fresh.first_200 else None
        rows.append(
            [
                f"process start to first 200, {name}, p50",
                f"<= {TARGET_FRESH_FIRST_200_MS:g} ms",
                "-" if value is None else f"{value} ms",
                verdict(None if value is None else value <= TARGET_FRESH_FIRST_200_MS),
            ]
        )
    rows.append(
        [
            "`burrow forward PORT` vs `ssh -N -R`, start to first 200 (medians)",
            "<= 1x",
            "-" if ratio is None else f"{ratio}x ({cli} vs {ssh} ms)",
            verdict(None if ratio is None else ratio <= 1.0),
        ]
    )
    return rows


def baseline(relay: rp.Relay, ctx: ssl.SSLContext, deadline: float) -> list[float]:
    """The floor under every sample: one HTTPS GET the relay answers itself (404)."""
    host = "nosuchtunnel00.r1.localhost"
    times: list[float] = []

    def one(_: int) -> None:
        t0 = time.perf_counter()
        if https_status(ctx, relay.port, host) == 404:
            times.append(time.perf_counter() - t0)

    run_loop(deadline, SAMPLES, one)
    return times


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--json", type=Path, help="Where to write the result (default: print it as Markdown)."
    )
    parser.add_argument(
        "--budget", type=float, default=90.0, help="Seconds the whole run may take."
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    rp.raise_nofile()
    budget = rp.Budget(args.budget)
    notes: list[str] = []
    with rp.processes() as procs:
        relay = rp.start_relay(procs)
        port = rp.start_local_server(procs, "http")
        ctx = ssl.create_default_context(cafile=relay.ca)
        relay_fds = rp.open_fds(relay.pid)
        before = rp.Snapshot.of(relay.pid)

        floor = baseline(relay, ctx, budget.share(0.05))
        started = time.monotonic()
        live_samples = live(relay, port, ctx, budget.share(0.15))
        live_seconds = time.monotonic() - started
        started = time.monotonic()
        cold_samples = cold(relay, port, ctx, budget.share(0.3))
        cold_seconds = time.monotonic() - started
        after = rp.Snapshot.of(relay.pid)
        relay_fds_after = rp.open_fds(relay.pid)
        started = time.monotonic()
        fresh = new_process(relay, port, ctx, procs.workdir, budget.share(0.95))
        fresh_seconds = time.monotonic() - started

    s = Samples()
    latency = rp.table(
        "Set-up latency, ms (p50/p90/p99 nearest-rank; total = forward() to first HTTP 200)",
        ["case", "samples", "p50", "p90", "p99", "max", "target p50", "met"],
        [
            s.row("baseline: GET the relay answers itself (404)", floor, None),
            s.row("live session: total", live_samples.total, TARGET_LIVE_MS),
            s.row("live session: forward() enter only", live_samples.enter, None),
            s.row("live session: leaving the block", live_samples.exit, None),
            s.row("cold session: total", cold_samples.total, TARGET_COLD_MS),
            s.row("cold session: forward() enter only", cold_samples.enter, None),
        ],
    )
    fresh_table = rp.table(
        "A new process, ms (p50/p90/p99 nearest-rank; each sample a process of its own)",
        ["case", "samples", "p50", "p90", "p99", "max", "target", "met"],
        new_process_rows(fresh),
    )
    targets = rp.table(
        "Targets of issue 9 (a new process gets its tunnel in milliseconds), from this run",
        ["what", "target", "measured", "met?"],
        new_process_targets(fresh),
    )
    runs = rp.table(
        "Samples taken",
        ["case", "planned", "taken", "failed", "extra requests", "seconds"],
        [
            [
                "live session",
                SAMPLES,
                len(live_samples.total),
                live_samples.failures,
                live_samples.retries,
                round(live_seconds, 1),
            ],
            [
                "cold session",
                SAMPLES,
                len(cold_samples.total),
                cold_samples.failures,
                cold_samples.retries,
                round(cold_seconds, 1),
            ],
            [
                "new process (rounds of every case)",
                FRESH_SAMPLES,
                fresh.rounds,
                fresh.private.failures
                + fresh.bundle.failures
                + fresh.cli.failures
                + fresh.ssh.failures,
                fresh.private.retries + fresh.bundle.retries + fresh.cli.retries,
                round(fresh_seconds, 1),
            ],
        ],
    )
    relay_table = rp.table(
        "Relay process during the live and cold runs",
        ["RSS before MiB", "RSS after MiB", "CPU s", "open fds before", "open fds after"],
        [
            [
                rp.mib(before.rss),
                rp.mib(after.rss),
                round(after.cpu - before.cpu, 2),
                relay_fds,
                relay_fds_after,
            ]
        ],
    )
    notes += [
        "Relay: `burrow dev` in its own process; local server: a uvloop HTTP server in "
        "another; agent: burrow.forward() in the benchmark process (its background thread).",
        "Each request is a new TCP + TLS 1.3 connection to 127.0.0.1:<relay port> with "
        "SNI = the tunnel's name, trusting the dev CA, then GET / until the status line.",
        f"Live: {WARMUP} unrecorded warm-up tunnels first; the session stays up between "
        "samples. Cold: a freshly minted token per sample (minting not timed), so each "
        "forward() connects a new session; it is closed after the sample (not timed).",
        "New process: each round starts, one after another, a bare `python -c` and one that "
        "imports burrow (each timed from its start to when it prints, ready: its exit, some "
        "10 ms more for burrow's, is left out), a workload that imports burrow and "
        "forwards the local port with BURROW_CA set (private CA), the same with no BURROW_CA "
        "and SSL_CERT_FILE pointing at the system's CA bundle plus the dev CA (a relay trusted "
        "like a public one, through a store of the system's size), `burrow forward PORT`, and "
        "`ssh -N -R` to a loopback sshd (anchors.sshd; Debian's defaults, key auth). "
        "'forward() enter' is timed inside the workload; 'process start to first 200' from "
        "just before the process is started to the first 200 a visitor in the benchmark gets "
        "through the tunnel, once the process has shown it (its JSON line, or the URL "
        "`burrow forward` prints; ssh's port is polled every 0.5 ms). 'CPU time' is the "
        "workload's own (all its threads, interpreter start-up included): the work, which "
        "other load on the machine does not inflate as it does the wall-clock figures.",
        "New processes run as an installed package would: byte code cached (warmed by "
        "untimed runs first); the benchmark's own PYTHONDONTWRITEBYTECODE is dropped. "
        f"Each sample starts {SETTLE * 1000:g} ms after the last one ended.",
        "Load: "
        + "load average at the end {:.2f} {:.2f} {:.2f} on {} cores".format(
            *os.getloadavg(), os.cpu_count()
        )
        + "; other work on the machine shows in the new-process figures most.",
        "Baseline: the same request to an unknown name under the relay's domain, which the "
        "relay answers with a 404 itself: the cost of the visitor's TCP + TLS alone.",
        "'extra requests' counts requests that did not return 200 at once (0 expected).",
        f"Run took {budget.elapsed():.1f} s of a {args.budget:g} s budget.",
    ]
    if fresh.bundle_file is None:
        notes.append("No system CA bundle was found: the system-size bundle case was skipped.")
    if fresh.ssh_problem is not None:
        notes.append(f"sshd could not be started ({fresh.ssh_problem}): no ssh -R figure.")
    tables = [targets, latency, fresh_table, runs, relay_table]
    rp.emit(args.json, TITLE, tables, notes)


if __name__ == "__main__":
    main()
