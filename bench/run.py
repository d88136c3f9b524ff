"""Run every benchmark of burrow against its anchors and rewrite docs/benchmarks.md.

    python bench/run.py            # the figures of record: at most 10 minutes on 2 cores
    python bench/run.py --quick    # a smoke run: one short run of everything

Direct, ``ssh -R``, socat and burrow (raw TCP and HTTPS) are all set up at
once in front of the same iperf3 and nginx on 127.0.0.1, then each
measurement goes round the setups in turn, run after run, so that drift on
the machine touches every setup alike.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anchors
import machine
import measure
import procs
import report
from anchors import Endpoint, Setup
from procs import BenchError, tail
from report import Column, Results
from servers import backends

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
COMMAND = "python bench/run.py"
# Tunnel set-up, scale and the HTTP/2 check's cost are measured by scripts of their own,
# given a time budget.
EXTERNAL = (
    ("setup_latency.py", "Tunnel set-up"),
    ("scale.py", "Scale"),
    ("h2_inspection.py", "HTTP/2 inspection (the cross-tenant check)"),
    ("metrics_cost.py", "Metrics (what --metrics costs)"),
    ("wan.py", "Across distance (30 ms paths)"),
)
EXTERNAL_GRACE = 20.0
# Seconds kept at the end for charts and the report.
REPORT_RESERVE = 15.0


@dataclass(frozen=True)
class Plan:
    runs: int
    iperf_seconds: float
    download_bytes: int
    parallel_download_bytes: int
    """All eight streams together."""
    latency_seconds: float
    latency_connections: int
    rate_seconds: float
    rate_connections: int
    ttfb_count: int
    burst_connections: int
    """Fresh connections opened at once through a warm tunnel."""
    external_budget: float
    """Seconds each of the external scripts may take."""
    measure_budget: float
    """Seconds for this script's own measurements; runs that would not fit are skipped."""
    total_budget: float
    """Seconds for everything; the external scripts get less if time is short."""


FULL = Plan(
    runs=3,
    iperf_seconds=3,
    download_bytes=measure.GIB,
    parallel_download_bytes=measure.GIB // 2,
    latency_seconds=3,
    latency_connections=10,
    rate_seconds=2,
    rate_connections=64,
    ttfb_count=50,
    burst_connections=200,
    external_budget=90,
    measure_budget=430,
    total_budget=590,
)
QUICK = Plan(
    runs=1,
    iperf_seconds=1,
    download_bytes=256 * 1024**2,
    parallel_download_bytes=256 * 1024**2,
    latency_seconds=1,
    latency_connections=10,
    rate_seconds=1,
    rate_connections=64,
    ttfb_count=10,
    burst_connections=200,
    external_budget=20,
    measure_budget=120,
    total_budget=240,
)
RATES = (1000, 5000)
# Relay worker processes in the multi-core setup: one per core.
WORKERS = max(2, os.cpu_count() or 1)


def _step(
    results: Results,
    plan: Plan,
    deadline: float,
    name: str,
    setups: list[Setup],
    fn: Callable[[Setup], dict[str, float | None]],
) -> None:
    """Run ``fn`` on each setup, ``plan.runs`` times round, recording every figure."""
    started = time.monotonic()
    failed: dict[str, tuple[list[int], str]] = {}
    for run in range(plan.runs):
        if run and time.monotonic() > deadline:
            results.problems.append(f"{name}: only {run} of {plan.runs} runs, out of time")
            break
        for setup in setups:
            gone = setup.gone()
            if gone is not None:
                runs, _ = failed.setdefault(setup.label, ([], gone))
                runs.append(run + 1)
                continue
            try:
                figures = fn(setup)
            except BenchError as exc:
                runs, _ = failed.setdefault(setup.label, ([], str(exc)))
                runs.append(run + 1)
                print(f"  {setup.key}: FAILED {exc}", file=sys.stderr)
                continue
            for metric, value in figures.items():
                results.add(metric, setup.key, value)
            shown = ", ".join(f"{k}={report.number(v)}" for k, v in figures.items())
            print(f"  {name} run {run + 1} {setup.key}: {shown}", file=sys.stderr)
    for label, (runs, why) in failed.items():
        which = ", ".join(map(str, runs))
        results.problems.append(f"{name}, {label}: failed in run {which}: {why}")
    print(f"{name}: {time.monotonic() - started:.1f}s", file=sys.stderr)


STEPS = (
    "iperf1",
    "dl1",
    "iperf8",
    "dl8",
    *(f"lat{r}" for r in RATES),
    "rate64",
    "ttfb",
    "burst",
)
# Between two bursts: the last one's connections close and a tunnel's pool refills.
BURST_PAUSE_SECONDS = 0.5
# Bursts per setup in each run, their median its figure: ssh -R listens with a
# backlog of 128, so a burst of 200 sometimes loses SYNs and waits the 1 s
# retransmit, and one burst alone says little.
BURSTS_PER_RUN = 3
SLOW_BURST_SECONDS = 1.0


def measure_all(
    results: Results,
    plan: Plan,
    setups: list[Setup],
    file_size: int,
    only: frozenset[str] = frozenset(STEPS),
) -> None:
    deadline = time.monotonic() + plan.measure_budget
    raw = [s for s in setups if s.iperf_port is not None]
    http = [s for s in setups if s.http is not None]
    tls = [s for s in setups if s.tls is not None]
    # Read the big file once, so that no setup pays for filling the page cache.
    direct = next(s for s in setups if s.key == report.DIRECT)
    assert direct.http is not None
    with contextlib.suppress(BenchError):
        measure.download(direct.http, file_size, 1, file_size=file_size)

    def one_worker(chosen: list[Setup]) -> list[Setup]:
        # Latency and new connections are the same path with workers or without:
        # measured once, to keep the run within its time.
        return [s for s in chosen if f"-w{WORKERS}-" not in s.key]

    def iperf(streams: int) -> Callable[[Setup], dict[str, float | None]]:
        def fn(setup: Setup) -> dict[str, float | None]:
            assert setup.iperf_port is not None
            bulk = measure.iperf3(setup.iperf_port, streams, plan.iperf_seconds, setup.pids)
            return {f"iperf{streams}": bulk.gbit_s, f"iperf{streams}.cpu": bulk.cpu_s_per_gib}

        return fn

    def download(streams: int) -> Callable[[Setup], dict[str, float | None]]:
        def fn(setup: Setup) -> dict[str, float | None]:
            assert setup.http is not None
            size = plan.download_bytes if streams == 1 else plan.parallel_download_bytes
            bulk = measure.download(setup.http, size, streams, file_size=file_size, pids=setup.pids)
            return {f"dl{streams}": bulk.gbit_s, f"dl{streams}.cpu": bulk.cpu_s_per_gib}

        return fn

    def latency(rate: int) -> Callable[[Setup], dict[str, float | None]]:
        def fn(setup: Setup) -> dict[str, float | None]:
            assert setup.http is not None
            got = measure.latency(setup.http, rate, plan.latency_connections, plan.latency_seconds)
            return {
                f"lat{rate}.p50": got.p50_ms,
                f"lat{rate}.p99": got.p99_ms,
                f"lat{rate}.p999": got.p999_ms,
                f"lat{rate}.rate": got.rate,
            }

        return fn

    def rate(setup: Setup) -> dict[str, float | None]:
        assert setup.http is not None
        return {"rate64": measure.max_rate(setup.http, plan.rate_connections, plan.rate_seconds)}

    def ttfb(setup: Setup) -> dict[str, float | None]:
        assert setup.tls is not None
        got = measure.fresh_tls_ttfb(setup.tls, plan.ttfb_count)
        return {"ttfb.p50": got.p50_ms, "ttfb.p99": got.p99_ms}

    def burst(setup: Setup) -> dict[str, float | None]:
        figures: dict[str, float | None] = {}
        # Plain TCP where the setup carries it (burrow's HTTPS URL is TLS only), then TLS.
        chosen = [("tcp", setup.http if setup.iperf_port is not None else None), ("tls", setup.tls)]
        for kind, endpoint in chosen:
            if endpoint is None:
                continue
            bursts = []
            for _ in range(BURSTS_PER_RUN):
                time.sleep(BURST_PAUSE_SECONDS)
                bursts.append(measure.burst(endpoint, plan.burst_connections))
            figures[f"burst.{kind}"] = statistics.median(b.seconds for b in bursts)
            figures[f"burst.{kind}.errors"] = sum(b.errors for b in bursts)
            figures[f"burst.{kind}.slow"] = sum(b.seconds >= SLOW_BURST_SECONDS for b in bursts)
        return figures

    steps: list[tuple[str, str, list[Setup], Callable[[Setup], dict[str, float | None]]]] = [
        # The figures the targets are about come first, so that they get every run.
        ("iperf1", "iperf3, 1 stream", raw, iperf(1)),
        ("dl1", "download, 1 stream", http, download(1)),
        ("lat1000", "latency at 1000 req/s", one_worker(http), latency(1000)),
        ("ttfb", "fresh TLS TTFB", one_worker(tls), ttfb),
        ("burst", "a burst of fresh connections", one_worker(tls), burst),
        ("iperf8", "iperf3, 8 streams", raw, iperf(8)),
        ("dl8", "download, 8 streams", http, download(8)),
        ("lat5000", "latency at 5000 req/s", one_worker(http), latency(5000)),
        ("rate64", "highest request rate", http, rate),
    ]
    for key, name, chosen, fn in steps:
        if key in only:
            _step(results, plan, deadline, name, chosen, fn)


def worker_spread(
    plan: Plan, setups: list[Setup], endpoints: list[Endpoint], file_size: int
) -> dict[str, Any] | None:
    """CPU of each relay worker while HTTPS traffic crosses tunnels that all workers own."""
    setup = next((s for s in setups if s.key == f"burrow-w{WORKERS}-https"), None)
    if setup is None or setup.gone() is not None or not endpoints:
        return None
    workers = procs.children(setup.pids[0])
    streams = max(1, 8 // len(endpoints))
    connections = max(1, plan.rate_connections // len(endpoints))

    def together(job: Callable[[Endpoint], object]) -> None:
        with concurrent.futures.ThreadPoolExecutor(len(endpoints)) as pool:
            for done in [pool.submit(job, e) for e in endpoints]:
                done.result()

    size = plan.parallel_download_bytes // len(endpoints)
    loads: list[tuple[str, Callable[[], None]]] = [
        (
            f"{streams * len(endpoints)} parallel HTTPS downloads over {len(endpoints)} tunnels",
            lambda: together(lambda e: measure.download(e, size, streams, file_size=file_size)),
        ),
        (
            f"{connections * len(endpoints)} HTTPS connections over {len(endpoints)} tunnels, "
            "highest request rate",
            lambda: together(lambda e: measure.max_rate(e, connections, plan.rate_seconds)),
        ),
    ]
    rows: list[list[str]] = []
    shares: list[float] = []
    for name, load in loads:
        before = [procs.cpu_seconds([pid]) for pid in workers]
        started = time.monotonic()
        try:
            load()
        except BenchError as exc:
            rows.append([name, *(["-"] * len(workers)), f"failed: {exc}"])
            continue
        elapsed = time.monotonic() - started
        used = [procs.cpu_seconds([pid]) - b for pid, b in zip(workers, before, strict=True)]
        shares += [u / elapsed for u in used]
        rows.append([name, *(f"{u / elapsed:.0%}" for u in used), f"{sum(used) / elapsed:.0%}"])
    return {
        "caption": f"Relay with {len(workers)} worker processes: share of a core each used",
        "columns": ["load", *(f"worker {i}" for i in range(len(workers))), "all workers"],
        "rows": rows,
        "min_share": min(shares) if shares else None,
    }


# -- the external scripts -------------------------------------------------------------


def run_external(script: str, budget: float, tmp: Path) -> tuple[dict[str, Any] | None, str]:
    """Run ``bench/<script> --json OUT --budget B``; return its JSON or why there is none."""
    path = BENCH / script
    if not path.exists():
        return None, f"`bench/{script}` is not there yet, so this section has no figures."
    out = tmp / f"{path.stem}.json"
    log = tmp / f"{path.stem}.log"
    started = time.monotonic()
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(path), "--json", str(out), "--budget", f"{budget:g}"],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            cwd=REPO,
            start_new_session=True,
        )
        try:
            code = proc.wait(budget + EXTERNAL_GRACE)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait()
            return None, (
                f"`bench/{script}` did not finish within its budget of {budget:g}s "
                f"(+{EXTERNAL_GRACE:g}s grace) and was stopped: {tail(log)}"
            )
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)  # whatever it left behind
    print(f"{script}: {time.monotonic() - started:.1f}s, exit {code}", file=sys.stderr)
    if code != 0:
        return None, f"`bench/{script}` failed with exit code {code}: {tail(log)}"
    try:
        data = json.loads(out.read_text())
    except (OSError, ValueError) as exc:
        return None, f"`bench/{script}` wrote no readable JSON ({exc}): {tail(log)}"
    if not isinstance(data, dict) or not isinstance(data.get("tables", []), list):
        return None, f"`bench/{script}` wrote JSON of an unexpected shape."
    return data, ""


# -- the report -----------------------------------------------------------------------


def _targets(
    results: Results, plain_offered: bool, spread: dict[str, Any] | None
) -> dict[str, Any]:
    def at_least(value: float | None, goal: float) -> str:
        return "-" if value is None else ("yes" if value >= goal else "**no**")

    def at_most(value: float | None, goal: float) -> str:
        return "-" if value is None else ("yes" if value <= goal else "**no**")

    def added(metric: str, setup: str) -> float | None:
        value, ref = results.median(metric, setup), results.median(metric, report.DIRECT)
        return None if value is None or ref is None else value - ref

    rows: list[list[str]] = []
    r = results.ratio("iperf1", "burrow-tcp", report.SSH)
    rows.append(["raw TCP tunnel, one stream (iperf3)", "≥ 1.5x ssh -R", report.ratio(r)])
    rows[-1].append(at_least(r, 1.5))
    if plain_offered:
        r = results.ratio("iperf1", "burrow-plain-tcp", report.DIRECT)
        rows.append(
            [
                "raw TCP, plaintext agent link (trusted networks only), one stream",
                "≥ 0.5x direct",
                report.ratio(r),
                at_least(r, 0.5),
            ]
        )
    else:
        rows.append(["plaintext agent link, one stream", "≥ 0.5x direct", "not offered yet", "-"])
    r = results.ratio("dl1", "burrow-https", report.SSH)
    rows.append(
        [
            "HTTPS 1 GiB download vs ssh -R carrying it as plain HTTP",
            "≥ 1.2x ssh -R",
            report.ratio(r),
            at_least(r, 1.2),
        ]
    )
    for setup, label in (("burrow-https", "HTTPS"), ("burrow-tcp", "raw TCP")):
        for pct, goal in (("p50", 0.15), ("p99", 1.0)):
            a = added(f"lat1000.{pct}", setup)
            rows.append(
                [
                    f"{label}: added {pct} at 1,000 req/s, kept-alive",
                    f"≤ {goal:g} ms over direct",
                    "-" if a is None else f"{a:+.3f} ms",
                    at_most(a, goal),
                ]
            )
    r = results.ratio("ttfb.p50", "burrow-https", report.DIRECT)
    rows.append(
        [
            "fresh TLS connection through the HTTPS tunnel, TTFB p50",
            "≤ 1.5x local TLS server",
            report.ratio(r),
            at_most(r, 1.5),
        ]
    )
    for kind, setup, label in (("tcp", "burrow-tcp", "raw TCP"), ("tls", "burrow-https", "HTTPS")):
        r = results.ratio(f"burst.{kind}", setup, report.SSH)
        errors = results.values.get(f"burst.{kind}.errors", {}).get(setup)
        measured = "-" if r is None else f"{r:.2f}x, {sum(errors or [0]):.0f} errors"
        slow = sum(results.values.get(f"burst.{kind}.slow", {}).get(report.SSH, []))
        if r is not None and slow:
            runs = results.runs(f"burst.{kind}", report.SSH) * BURSTS_PER_RUN
            measured += f" (ssh -R took 1 s+ in {slow:.0f} of {runs} bursts)"
        rows.append(
            [
                f"a burst of fresh connections through a warm tunnel, {label} (issue 13)",
                "≤ 2x ssh -R, no error",
                measured,
                "-" if r is None else ("yes" if r <= 2 and not any(errors or []) else "**no**"),
            ]
        )
    share = spread.get("min_share") if spread else None
    rows.append(
        [
            f"a busy relay uses every core ({WORKERS} workers, busy HTTPS)",
            "each worker does real work",
            "-" if share is None else f"least busy worker: {share:.0%} of a core",
            "-" if share is None else ("yes" if share >= 0.2 else "**no**"),
        ]
    )
    return {
        "caption": "Targets of issue 3, from this run",
        "columns": ["what", "target", "measured", "met?"],
        "rows": rows,
    }


SETUP_NOTES = """\
- **direct**: the client talks to the local server itself, no tunnel: the limit.
- **ssh -R**: `ssh -N -R 127.0.0.1:P:127.0.0.1:BACKEND` to Debian's sshd on
  loopback (default cipher and settings, key auth; ssh sets no TCP_NODELAY on
  a session without a terminal, which shows in fresh-connection latency).
- **socat relay**: `socat TCP-LISTEN:P,fork,nodelay TCP:127.0.0.1:BACKEND,nodelay`,
  a one-hop user-space relay.
- **burrow raw TCP**: `burrow forward PORT --tcp` through `burrow dev` on
  loopback; the visitor's bytes cross the relay's TCP port and the agent's
  TLS data connection.
- **burrow HTTPS**: the same tunnel's `https://<label>.r1.localhost` URL;
  TLS from the visitor ends at the relay.
- Backends on 127.0.0.1: `iperf3 -s`; nginx (1 worker, sendfile) serving a
  1 GiB file and a 3-byte `/small`, in plain HTTP and, for fresh TLS
  connections, in TLS with the dev CA's `*.r1.localhost` certificate. Through
  ssh -R, socat and burrow raw TCP, a fresh TLS connection goes end to end
  to that nginx TLS server; through burrow HTTPS it ends at the relay.
- Everything (clients, servers, tunnels) shares the same 2 cores, so a
  tunnel's CPU use slows its own clients too."""


def render(
    results: Results,
    plan: Plan,
    quick: bool,
    plain_option: str | None,
    info: dict[str, str],
    vers: dict[str, str],
    externals: list[tuple[str, dict[str, Any] | None, str]],
    pictures: dict[str, str],
    elapsed_measure: float,
    spread: dict[str, Any] | None,
) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out: list[str] = [
        "# Benchmarks",
        "",
        f"Generated by `{COMMAND}` on {now}; do not edit by hand, rerun it. "
        + (
            "**This is a `--quick` smoke run: one short run each, not figures of record.**"
            if quick
            else f"Every figure is the median of {plan.runs} runs made in this one run."
        ),
        "",
        "## How to run",
        "",
        "```sh",
        "pip install -e '.[bench]'",
        f"{COMMAND}            # under 10 minutes on 2 cores; rewrites this file and PNGs",
        f"{COMMAND} --quick    # a 2-minute smoke run of everything",
        "python bench/setup_latency.py   # tunnel set-up alone (90 s), printed as Markdown",
        "```",
        "",
        "As root it installs what is missing with `apt-get` (iperf3, socat, nghttp2-client,",
        "openssh-server, openssh-client, curl, nginx). All traffic stays on 127.0.0.1.",
        "",
        "## Machine and versions",
        "",
        report.markdown_table(
            {
                "columns": ["", ""],
                "rows": [[k, v] for k, v in {**info, **vers}.items()],
            },
            numbers=False,
        ),
        "",
        "## Setups",
        "",
        SETUP_NOTES,
    ]
    if plain_option is None:
        out.append(
            "- **burrow with a plaintext agent link** (trusted networks only): not offered "
            "yet (`burrow dev --help` has no `--plain-data`)."
        )
    else:
        out.append(
            f"- **burrow plain link†** (`burrow dev {plain_option}`): † for trusted networks "
            "only: the agent's data connections carry the bytes without TLS."
        )
    out += [
        "",
        "Ratios are this setup's figure divided by direct's, and by ssh -R's: above 1x "
        "is faster for throughput and rates, slower for latencies.",
        "",
        "## Targets",
        "",
        report.markdown_table(_targets(results, plain_option is not None, spread)),
        "",
    ]

    def section(title: str, tables: list[dict[str, Any]], picture: str | None, text: str) -> None:
        out.extend([f"## {title}", "", text, ""])
        for table in tables:
            out.extend([report.markdown_table(table), ""])
        if picture and picture in pictures:
            out.extend([f"![{pictures[picture]}]({picture})", ""])

    def mib(n: int) -> str:
        return "1 GiB" if n == measure.GIB else f"{n // 1024**2} MiB"

    size, parallel = mib(plan.download_bytes), mib(plan.parallel_download_bytes)
    section(
        "1. Bulk throughput",
        [
            report.metric_table(
                results,
                "One stream (Gbit/s)",
                [Column("iperf1", "iperf3 (Gbit/s)"), Column("dl1", f"{size} download (Gbit/s)")],
            ),
            report.metric_table(
                results,
                "Eight parallel streams (Gbit/s, all streams together)",
                [Column("iperf8", "iperf3 -P 8 (Gbit/s)"), Column("dl8", "8 ranges (Gbit/s)")],
            ),
            report.metric_table(
                results,
                "CPU seconds the tunnel's processes spent per GiB carried, one stream",
                [
                    Column("iperf1.cpu", "iperf3 (CPU s/GiB)", ratios=False),
                    Column("dl1.cpu", "download (CPU s/GiB)", ratios=False),
                ],
            ),
        ],
        "bench-throughput.png",
        f"iperf3 for {plan.iperf_seconds:g} s through the raw TCP tunnel (client to server), "
        f"and a {size} download of nginx's file with curl (server to client) over plain HTTP, "
        "or over the HTTPS URL for burrow HTTPS. Eight streams: `iperf3 -P 8`, and eight "
        f"curl processes each fetching an eighth of {parallel} as a byte range. CPU is "
        "read from /proc for relay and agent, sshd and ssh, or socat.",
    )
    section(
        "2. Request latency",
        [
            report.metric_table(
                results,
                f"{rate:,} requests/s on {plan.latency_connections} kept-alive connections (ms)",
                [
                    Column(f"lat{rate}.p50", "p50 (ms)"),
                    Column(f"lat{rate}.p99", "p99 (ms)"),
                    Column(f"lat{rate}.p999", "p99.9 (ms)"),
                    Column(f"lat{rate}.rate", "achieved (req/s)", ratios=False),
                ],
            )
            for rate in RATES
        ],
        "bench-latency.png",
        f"`h2load --h1 -c {plan.latency_connections} -m 1 --rps R/{plan.latency_connections} "
        f"-D {plan.latency_seconds:g} --log-file`: GET `/small` at a fixed rate; percentiles "
        "computed from every request's latency in the log.",
    )
    section(
        "3. Highest request rate",
        [
            report.metric_table(
                results,
                f"{plan.rate_connections} kept-alive connections (requests/s)",
                [Column("rate64", "requests/s")],
            )
        ],
        "bench-requests.png",
        f"`h2load --h1 -c {plan.rate_connections} -m 1 -D {plan.rate_seconds:g}` "
        "(one client thread) as fast as it goes.",
    )
    section(
        "4. New-connection latency",
        [
            report.metric_table(
                results,
                "Time to first byte of a fresh TLS connection (ms)",
                [Column("ttfb.p50", "p50 (ms)"), Column("ttfb.p99", "p99 (ms)")],
            ),
            report.metric_table(
                results,
                f"A burst of {plan.burst_connections} fresh connections at once: until the "
                "last has its first byte (s)",
                [
                    Column("burst.tcp", "plain TCP (s)"),
                    Column("burst.tcp.slow", "slow", ratios=False),
                    Column("burst.tcp.errors", "errors", ratios=False),
                    Column("burst.tls", "TLS (s)"),
                    Column("burst.tls.slow", "slow", ratios=False),
                    Column("burst.tls.errors", "errors", ratios=False),
                ],
            ),
        ],
        None,
        f"{plan.ttfb_count} sequential `curl -w %{{time_starttransfer}}` per run, one process "
        "each, so no TLS session is resumed. *direct* is a fresh TLS connection to the local "
        "nginx TLS server: the anchor of the target. The burst: `h2load --h1 "
        f"-c {plan.burst_connections} -n {plan.burst_connections}` opens "
        f"{plan.burst_connections} connections in the same instant through a tunnel already "
        "in use, one GET `/small` on each, nothing reused; the figure is the slowest "
        "connection's time from its connect to its first byte. Each run makes "
        f"{BURSTS_PER_RUN} bursts per setup, {BURST_PAUSE_SECONDS:g} s apart, and takes their "
        "median; *slow* counts a run's bursts that took a second or more (a SYN dropped by a "
        "full listen queue waits 1 s for its retransmit: ssh -R listens with a backlog of "
        "128), *errors* its connections without a 200 (medians over the runs). Plain TCP is "
        "nginx's plain HTTP (burrow's raw TCP port), TLS a fresh TLS connection as above (to "
        "nginx through ssh -R, socat and burrow raw TCP; ended by the relay through burrow "
        "HTTPS). Through burrow the tunnel has served the measurements before; its first "
        "burst after a quiet spell is slower (see What limits it now).",
    )
    out.extend(["## 5. Every core", ""])
    if spread is None:
        out.extend(["Not measured: the relay with worker processes was not set up.", ""])
    else:
        out.extend(
            [
                f"`burrow dev --workers {WORKERS}`: the relay in {WORKERS} processes sharing "
                "its port (see docs/operations.md). A tunnel is served by the worker that owns "
                "its label, so the load here is HTTPS traffic over several tunnels, each from "
                "an agent of its own, two owned by each worker. CPU of each worker process "
                "over the load, as a share of one core; the clients, nginx and the agents "
                "share the same cores.",
                "",
                report.markdown_table(spread, numbers=False),
                "",
            ]
        )
    for title, data, problem in externals:
        out.extend([f"## {title}", ""])
        if data is None:
            out.extend([problem, ""])
            continue
        if data.get("title"):
            out.extend([f"*{data['title']}*", ""])
        for table in data.get("tables", []):
            out.extend([report.markdown_table(table), ""])
        out.extend(f"- {note}" for note in data.get("notes", []))
        out.append("")
    out.extend(["## What limits it now", ""])
    limits = BENCH / "limits.md"
    if limits.exists():
        out.extend([limits.read_text().strip(), ""])
    else:
        out.extend(["*Not written yet: `bench/limits.md` is included here once it exists.*", ""])
    out.extend(["## Problems in this run", ""])
    if results.problems:
        out.extend(f"- {p}" for p in results.problems)
    else:
        out.append("None: every measurement completed.")
    out.extend(["", f"Own measurements took {elapsed_measure:.0f} s.", ""])
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short run of everything")
    parser.add_argument(
        "--out", type=Path, default=REPO / "docs", help="where benchmarks.md and PNGs go"
    )
    parser.add_argument(
        "--no-external",
        action="store_true",
        help="skip setup_latency.py, scale.py and h2_inspection.py",
    )
    parser.add_argument(
        "--only",
        help=f"comma-separated measurements to take (of {','.join(STEPS)}); "
        "for working on one figure, not for the record",
    )
    parser.add_argument(
        "--setups",
        help="comma-separated setup keys to measure besides direct (e.g. ssh,burrow-tcp)",
    )
    args = parser.parse_args(argv)
    only = frozenset(STEPS if args.only is None else args.only.split(","))
    if not only <= set(STEPS):
        parser.error(f"--only: unknown {', '.join(sorted(only - set(STEPS)))}")
    started = time.monotonic()
    plan = QUICK if args.quick else FULL
    try:
        machine.ensure_tools()
    except machine.MissingTools as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    os.environ["PATH"] = machine.PATH
    info, vers = machine.description(), machine.versions(REPO)
    plain_option = anchors.plain_link_option()
    results = Results()
    with tempfile.TemporaryDirectory(prefix="burrow-bench-") as tmp_name:
        tmp = Path(tmp_name)
        tmp.chmod(0o755)  # nginx's worker reads the files below
        state = tmp / "burrow-state"
        with contextlib.ExitStack() as stack:
            try:
                back = stack.enter_context(backends(tmp, state, measure.GIB))
                setups = [
                    stack.enter_context(anchors.direct(back)),
                    stack.enter_context(anchors.ssh_reverse(back, tmp / "ssh")),
                    stack.enter_context(anchors.socat(back, tmp)),
                    *stack.enter_context(anchors.burrow(back, tmp / "burrow", state)),
                ]
                # The relay in one worker process per core, as a busy relay runs.
                try:
                    setups += stack.enter_context(
                        anchors.burrow(
                            back,
                            tmp / "burrow-workers",
                            tmp / "burrow-workers-state",
                            workers=WORKERS,
                        )
                    )
                except BenchError as exc:
                    results.problems.append(f"relay with {WORKERS} workers: {exc}")
                if plain_option is not None:
                    try:
                        # A state dir of its own: a dev relay's pid and settings live there.
                        plain_state = tmp / "burrow-plain-state"
                        setups += stack.enter_context(
                            anchors.burrow(back, tmp / "burrow-plain", plain_state, plain_option)
                        )
                    except BenchError as exc:
                        results.problems.append(f"plaintext agent link: {exc}")
            except BenchError as exc:
                print(f"bench: cannot set up: {exc}", file=sys.stderr)
                return 1
            if args.setups:
                keep = {report.DIRECT, *args.setups.split(",")}
                setups = [s for s in setups if s.key in keep]
            results.labels = {s.key: s.label for s in setups}
            print(f"set up in {time.monotonic() - started:.1f}s", file=sys.stderr)
            measure_start = time.monotonic()
            measure_all(results, plan, setups, measure.GIB, only)
            spread = None
            if not (args.only or args.setups):
                try:
                    with anchors.spread_tunnels(
                        back, tmp / "spread", tmp / "burrow-workers-state", WORKERS
                    ) as endpoints:
                        spread = worker_spread(plan, setups, endpoints, measure.GIB)
                except BenchError as exc:
                    results.problems.append(f"every core: {exc}")
            elapsed_measure = time.monotonic() - measure_start
        externals: list[tuple[str, dict[str, Any] | None, str]] = []
        if args.no_external or args.only or args.setups:
            externals = [(t, None, "Skipped.") for _, t in EXTERNAL]
        else:
            for i, (script, title) in enumerate(EXTERNAL):
                # Whatever happened before, the whole run stays within its limit.
                left = plan.total_budget - (time.monotonic() - started) - REPORT_RESERVE
                share = left / (len(EXTERNAL) - i) - EXTERNAL_GRACE
                budget = min(plan.external_budget, share)
                if budget < 10:
                    externals.append((title, None, f"Not run: no time left for `bench/{script}`."))
                    continue
                data, problem = run_external(script, budget, tmp)
                externals.append((title, data, problem))
    args.out.mkdir(parents=True, exist_ok=True)
    note = "(--quick)" if args.quick else f"(median of {plan.runs})"
    pictures = report.charts(results, args.out, note)
    text = render(
        results,
        plan,
        args.quick,
        plain_option,
        info,
        vers,
        externals,
        pictures,
        elapsed_measure,
        spread,
    )
    (args.out / "benchmarks.md").write_text(text)
    print(f"wrote {args.out / 'benchmarks.md'}", file=sys.stderr)
    for problem in results.problems:
        print(f"problem: {problem}", file=sys.stderr)
    print(f"total run time: {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
