"""What the relay's metrics cost: request rate and latency with --metrics on and off, and a scrape.

    python bench/metrics_cost.py                  # about 4 minutes; prints Markdown
    python bench/metrics_cost.py --quick          # under a minute, fewer rounds
    python bench/metrics_cost.py --json OUT.json --budget 90   # as bench/run.py runs it

Two `burrow dev` relays run side by side, identical but for `--metrics
127.0.0.1:0` on one, whose /metrics a Prometheus-like scraper in this process
reads every second all through the measurement. Each relay has an agent (its
own process) forwarding an HTTPS tunnel to the same nginx. Each round starts
two new ones, the one with metrics first in every other round, and measures
the two A, B, B, A, the order flipping every round, so that drift on the machine
and any difference between the two places touch both alike (``--control``: the
same with metrics on neither, to see what is left):

- the highest request rate on 64 kept-alive connections (bench/run.py's rate64);
- latency at 1,000 requests/s on 10 kept-alive connections (its lat1000).

Then a third relay with metrics holds 10 tunnels, then 10,000 (opened by real
agent sessions), and /metrics is fetched over and over at each size: the time of
one whole GET, and the number of series, which must not grow with tunnels.

Run by bench/run.py (its "external" scripts) with --json and --budget.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import _relayproc as rp
import machine
import measure
import scale
from anchors import Endpoint
from procs import HOST, BenchError
from servers import backends

TITLE = "Metrics: what --metrics costs the relay"

# The issue's targets.
RATE_TARGET = 0.97  # the rate with metrics is at least 97% of the rate without
P50_TARGET_MS = 0.05  # p50 at 1,000 requests/s moves by at most this
SCRAPE_TARGET_MS = 50.0  # one scrape with 10,000 tunnels

# As bench/run.py measures rate64 and lat1000.
RATE_CONNECTIONS = 64
LATENCY_RATE = 1000
LATENCY_CONNECTIONS = 10

SCRAPE_INTERVAL = 1.0  # Prometheus' usual interval is 15 s or more: once a second is harsh
SCRAPE_TIMEOUT = 10.0  # Prometheus' default scrape timeout
FEW_TUNNELS = 10
MANY_TUNNELS = 10_000
# Sessions that share the 10,000 tunnels: under MAX_TUNNELS_PER_SESSION each,
# and one token per session, so the per-token limits need no change.
MANY_SESSIONS = 10
SCRAPES = 20
# The third relay opens 10,000 tunnels at once, far past the per-token creation rate.
SCRAPE_RELAY_OPTIONS = ("--tunnel-rate", "1000000")
OPEN_SECONDS = "30"  # the agent's deadline for opening them

MAX_ROUNDS = 8
DEFAULT_BUDGET = 230.0
QUICK_BUDGET = 50.0
# Below this budget, each measurement runs 1 s instead of 2 s.
SHORT_BUDGET = 80.0
# Seconds each h2load run costs beyond its -D (start, 0.5 s warm-up, exit).
H2LOAD_OVERHEAD = 1.0
METRICS_LINE = "metrics, admin API and dashboard on "


# -- the setups -------------------------------------------------------------------------


@dataclass
class Setup:
    name: str
    endpoint: Endpoint
    relay_pid: int
    metrics_url: str | None
    processes: tuple[subprocess.Popen[bytes], ...] = ()
    """The agent's and the relay's, to stop at the end of the round."""


def start_setup(procs: rp.Processes, name: str, http_port: int, *, metrics: bool) -> Setup:
    extra = ("--metrics", f"{HOST}:0") if metrics else ()
    relay = rp.start_relay(procs, name, extra=extra)
    url = metrics_url(procs, relay) if metrics else None
    agent = rp.start_agent(procs, relay, http_port, tcp=False)
    endpoint = Endpoint(
        f"https://{agent.tunnel['host']}:{agent.tunnel['port']}", relay.port, Path(relay.ca)
    )
    return Setup(name, endpoint, relay.pid, url, (agent.proc, relay.proc))


def metrics_url(procs: rp.Processes, relay: rp.Relay) -> str:
    """The listener's URL, which `burrow dev` prints first on its standard output."""
    assert relay.proc.stdout is not None
    line = relay.proc.stdout.readline().decode()
    if not line.startswith(METRICS_LINE):
        raise BenchError(f"no metrics URL from burrow dev: {line!r} {procs.log_of(relay.proc)}")
    return line[len(METRICS_LINE) :].strip().rstrip("/")


# -- scraping ---------------------------------------------------------------------------


def _split(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").rpartition(":")
    return host, int(port)


def get_metrics(conn: http.client.HTTPConnection) -> str:
    conn.request(
        "GET",
        "/metrics",
        headers={"Accept": "text/plain;version=0.0.4", "User-Agent": "burrow-bench"},
    )
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise BenchError(f"/metrics answered {response.status}")
    return body.decode()


def series(text: str) -> int:
    """Samples in a Prometheus text exposition: the lines that are not comments."""
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def gauge(text: str, name: str) -> float:
    """The sum of a metric's samples (every label combination)."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and line[len(name)] in " {"
    )


def timed_scrapes(url: str, count: int) -> tuple[list[float], str]:
    """``count`` GETs of /metrics, each on a fresh connection: ms of each, the last body."""
    host, port = _split(url)
    times: list[float] = []
    text = ""
    for _ in range(count):
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection(host, port, timeout=SCRAPE_TIMEOUT)
        try:
            text = get_metrics(conn)
        finally:
            conn.close()
        times.append((time.perf_counter() - t0) * 1000)
        time.sleep(0.05)
    return times, text


@dataclass
class Scraper:
    """A Prometheus stand-in: one kept-alive connection, GET /metrics every second."""

    url: str
    times: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    series: set[int] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        host, port = _split(self.url)
        conn: http.client.HTTPConnection | None = None
        next_at = time.monotonic()
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += SCRAPE_INTERVAL
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=SCRAPE_TIMEOUT)
            t0 = time.perf_counter()
            try:
                text = get_metrics(conn)
            except (OSError, http.client.HTTPException, BenchError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = None
                continue
            self.times.append((time.perf_counter() - t0) * 1000)
            self.series.add(series(text))
        if conn is not None:
            conn.close()

    @contextlib.contextmanager
    def running(self) -> Iterator[Scraper]:
        self._stop.clear()  # a scraper runs again for each round's relay
        thread = threading.Thread(target=self.run, name="scraper", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(SCRAPE_TIMEOUT + 1)


# -- 10 and 10,000 tunnels --------------------------------------------------------------


@dataclass
class ScrapeCase:
    tunnels: int
    opened: int
    series: int
    times: list[float]
    body_bytes: int
    open_errors: dict[str, int]
    cpu_ms: float
    """Relay CPU per scrape, from /proc over all of them (10 ms ticks, so +-0.5 ms)."""


def open_tunnels(
    procs: rp.Processes, relay: rp.Relay, http_port: int, tunnels: int, sessions: int
) -> tuple[subprocess.Popen[bytes], int, dict[str, int]]:
    """An agent process (bench/scale.py's) holding ``tunnels`` HTTPS tunnels over
    ``sessions`` sessions, one token each, until it is stopped."""
    tokens = " ".join(relay.mint(f"metrics-{tunnels}-{i}") for i in range(sessions))
    agent = procs.start(
        f"agent-{tunnels}",
        [sys.executable, "-c", scale.IDLE_AGENT, str(http_port), "0", str(tunnels), OPEN_SECONDS],
        env={**relay.env, "BENCH_TOKENS": tokens},
        stdin=True,
    )
    assert agent.stdin is not None and agent.stdout is not None
    if not agent.stdout.readline():
        raise BenchError(f"agent failed: {procs.log_of(agent)}")
    agent.stdin.write(b"go\n")
    agent.stdin.flush()
    line = agent.stdout.readline()
    if not line:
        raise BenchError(f"agent failed: {procs.log_of(agent)}")
    got = json.loads(line)
    return agent, int(got["opened"]), dict(got["errors"])


def scrape_cases(procs: rp.Processes, http_port: int) -> list[ScrapeCase]:
    relay = rp.start_relay(
        procs, "relay-tunnels", extra=(*SCRAPE_RELAY_OPTIONS, "--metrics", f"{HOST}:0")
    )
    url = metrics_url(procs, relay)
    cases: list[ScrapeCase] = []
    held = 0
    errors: dict[str, int] = {}
    agents: list[subprocess.Popen[bytes]] = []
    for tunnels, sessions in ((FEW_TUNNELS, 1), (MANY_TUNNELS, MANY_SESSIONS)):
        agent, opened, failed = open_tunnels(procs, relay, http_port, tunnels - held, sessions)
        agents.append(agent)
        held += opened
        for kind, n in failed.items():
            errors[kind] = errors.get(kind, 0) + n
        time.sleep(0.3)  # the relay settles after the burst of opens
        cpu = rp.cpu_seconds(relay.pid)
        times, text = timed_scrapes(url, SCRAPES)
        cpu_ms = (rp.cpu_seconds(relay.pid) - cpu) / SCRAPES * 1000
        counted = int(gauge(text, "burrow_relay_tunnels"))
        if counted != held:
            raise BenchError(f"/metrics counts {counted} tunnels, the agents hold {held}")
        cases.append(
            ScrapeCase(tunnels, held, series(text), times, len(text), dict(errors), cpu_ms)
        )
    # Nothing of this case stays to share the cores with the rounds.
    for agent in agents:
        procs.stop(agent)
    procs.stop(relay.proc)
    return cases


# -- rounds -----------------------------------------------------------------------------


def one_round(
    setups: dict[str, Setup],
    order: list[str],
    figures: dict[str, dict[str, list[float]]],
    rate_seconds: float,
    latency_seconds: float,
) -> None:
    """Each measure A, B, B, A: a change of load that grows or fades through the round
    touches both relays alike. Each relay's figure of the round is the mean of its two."""
    abba = [*order, *reversed(order)]
    got: dict[str, dict[str, list[float]]] = {
        name: {key: [] for key in figures[name]} for name in order
    }
    for name in abba:
        setup = setups[name]
        cpu = rp.cpu_seconds(setup.relay_pid)
        rate = measure.max_rate(setup.endpoint, RATE_CONNECTIONS, rate_seconds)
        got[name]["rate"].append(rate)
        # h2load counts the main period only; the warm-up also cost CPU.
        served = rate * (rate_seconds + 0.5)
        got[name]["cpu_us"].append((rp.cpu_seconds(setup.relay_pid) - cpu) / served * 1e6)
    for name in abba:
        latency = measure.latency(
            setups[name].endpoint, LATENCY_RATE, LATENCY_CONNECTIONS, latency_seconds
        )
        got[name]["p50"].append(latency.p50_ms)
        got[name]["p99"].append(latency.p99_ms)
    for name, measured in got.items():
        for key, values in measured.items():
            figures[name][key].append(statistics.fmean(values))


def verdict(met: bool) -> str:
    return "yes" if met else "**no**"


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float], fmt: str) -> str:
    """The middle half of ``values`` (first to third quartile), to show the noise."""
    if len(values) < 2:
        return "one round"
    low, _, high = statistics.quantiles(values, n=4, method="inclusive")
    return f"middle half {fmt.format(low)} to {fmt.format(high)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="Where to write the result (default: Markdown).")
    parser.add_argument("--budget", type=float, help="Seconds the whole run may take.")
    parser.add_argument("--quick", action="store_true", help="a short run: fewer, shorter rounds")
    parser.add_argument(
        "--rounds",
        type=int,
        default=MAX_ROUNDS,
        help=f"At most this many rounds, within the budget (default {MAX_ROUNDS}): the "
        "noise of one round on a shared machine is several percent, so a run of record "
        "wants more.",
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="an A/A run: both relays without --metrics and no scraper, to see how far "
        "the two setups differ with nothing to tell them apart (prints the ratios only)",
    )
    args = parser.parse_args()
    seconds = args.budget or (QUICK_BUDGET if args.quick else DEFAULT_BUDGET)
    budget = rp.Budget(seconds)
    rp.raise_nofile()
    os.environ["PATH"] = machine.PATH
    load_start = os.getloadavg()
    short = args.quick or seconds < SHORT_BUDGET
    rate_seconds, latency_seconds = (1.0, 1.0) if short else (2.0, 2.0)
    figures: dict[str, dict[str, list[float]]] = {
        name: {"rate": [], "cpu_us": [], "p50": [], "p99": []} for name in ("on", "off")
    }
    rounds = 0
    round_seconds = 4 * (rate_seconds + latency_seconds + 2 * H2LOAD_OVERHEAD)
    with rp.processes() as procs:
        state = procs.workdir / "backends-state"
        with backends(procs.workdir / "backends", state, 1024**2) as back:
            # The scrape with 10,000 tunnels first: it has a fixed cost and a target of its own.
            cases = [] if args.control else scrape_cases(procs, back.http_port)
            scraper = Scraper("http://unused:0")
            while rounds < args.rounds and (rounds < 1 or budget.left() > round_seconds):
                # New relays each round, and the one with metrics started first in every
                # other round: a difference between the two places (which started first,
                # its ports, its agent) cancels out instead of passing for a cost.
                started = time.monotonic()
                first_on = rounds % 2 == 0
                first = start_setup(
                    procs, f"relay-a{rounds}", back.http_port, metrics=first_on and not args.control
                )
                second = start_setup(
                    procs,
                    f"relay-b{rounds}",
                    back.http_port,
                    metrics=not first_on and not args.control,
                )
                setups = {"on": first, "off": second} if first_on else {"on": second, "off": first}
                scraper.url = setups["on"].metrics_url or "http://unused:0"
                scraping = contextlib.nullcontext() if args.control else scraper.running()
                order = ["on", "off"] if rounds % 2 == 0 else ["off", "on"]
                with scraping:
                    one_round(setups, order, figures, rate_seconds, latency_seconds)
                for setup in (first, second):
                    for proc in setup.processes:
                        procs.stop(proc)
                round_seconds = time.monotonic() - started
                rounds += 1
                print(f"round {rounds}: {time.monotonic() - started:.1f}s", file=sys.stderr)
    load_end = os.getloadavg()

    on, off = figures["on"], figures["off"]
    if args.control:
        rates = [a / b for a, b in zip(on["rate"], off["rate"], strict=True)]
        p50s = [a - b for a, b in zip(on["p50"], off["p50"], strict=True)]
        print(
            f"A/A control, {rounds} rounds: rate second / first {statistics.median(rates):.3f} "
            f"({spread(rates, '{:.3f}')}); p50 second - first "
            f"{statistics.median(p50s):+.3f} ms ({spread(p50s, '{:+.3f}')})"
        )
        return
    # Each round measures both relays back to back: the per-round ratio or difference
    # leaves out drift from round to round, the median of them a round that a burst of
    # other work on the machine hit on one side only.
    rate_ratios = [a / b for a, b in zip(on["rate"], off["rate"], strict=True)]
    p50_diffs = [a - b for a, b in zip(on["p50"], off["p50"], strict=True)]
    p99_diffs = [a - b for a, b in zip(on["p99"], off["p99"], strict=True)]
    rate_ratio, p50_added, p99_added = median(rate_ratios), median(p50_diffs), median(p99_diffs)
    few, many = cases[0], cases[-1]
    scrape_p50, scrape_max = median(many.times), max(many.times)
    same_series = few.series == many.series
    targets = rp.table(
        "Targets (issue 12), from this run",
        ["what", "target", "measured", "met?"],
        [
            [
                f"highest request rate, {RATE_CONNECTIONS} kept-alive connections, "
                "metrics on / off (median of the rounds' ratios)",
                f">= {RATE_TARGET:.2f}",
                f"{rate_ratio:.3f} ({spread(rate_ratios, '{:.3f}')})",
                verdict(rate_ratio >= RATE_TARGET),
            ],
            [
                f"p50 at {LATENCY_RATE:,} requests/s, on - off (median of the rounds' differences)",
                f"<= {P50_TARGET_MS:.2f} ms",
                f"{p50_added:+.3f} ms ({spread(p50_diffs, '{:+.3f}')}); p99 {p99_added:+.3f} ms",
                verdict(p50_added <= P50_TARGET_MS),
            ],
            [
                f"one scrape of /metrics with {many.opened:,} tunnels (p50, max of "
                f"{len(many.times)})",
                f"<= {SCRAPE_TARGET_MS:g} ms",
                f"{scrape_p50:.2f} ms, max {scrape_max:.2f} ms",
                verdict(scrape_max <= SCRAPE_TARGET_MS and many.opened == MANY_TUNNELS),
            ],
            [
                f"series at {few.opened:,} and at {many.opened:,} tunnels",
                "equal",
                f"{few.series} and {many.series}",
                verdict(same_series and many.opened == MANY_TUNNELS),
            ],
        ],
    )

    def row(label: str, key: str, fmt: str, *, ratio: bool) -> list[str]:
        pairs = list(zip(on[key], off[key], strict=True))
        if ratio:
            change = f"{median([a / b for a, b in pairs]):.3f}"
        else:
            change = f"{median([a - b for a, b in pairs]):+.3f}"
        return [label, fmt.format(median(off[key])), fmt.format(median(on[key])), change]

    side = rp.table(
        "Two relays side by side, metrics off and on "
        + (f"(median of {rounds} rounds)" if rounds > 1 else "(one round)"),
        ["measure", "metrics off", "metrics on", "on / off or on - off, by round"],
        [
            row(
                f"highest request rate, {RATE_CONNECTIONS} connections (requests/s)",
                "rate",
                "{:,.0f}",
                ratio=True,
            ),
            row("relay CPU per request at that rate (us)", "cpu_us", "{:,.1f}", ratio=True),
            row(f"p50 at {LATENCY_RATE:,} requests/s (ms)", "p50", "{:.3f}", ratio=False),
            row(f"p99 at {LATENCY_RATE:,} requests/s (ms)", "p99", "{:.3f}", ratio=False),
        ],
    )
    scrapes = rp.table(
        "One GET /metrics on a fresh connection, by tunnels open on the relay (ms)",
        [
            "tunnels",
            "scrapes",
            "p50 ms",
            "max ms",
            "relay CPU ms per scrape",
            "series",
            "body bytes",
            "open errors",
        ],
        [
            [
                f"{c.opened:,}",
                len(c.times),
                round(median(c.times), 2),
                round(max(c.times), 2),
                round(c.cpu_ms, 1),
                c.series,
                c.body_bytes,
                "; ".join(f"{k} x{n}" for k, n in sorted(c.open_errors.items())) or "-",
            ]
            for c in cases
        ]
        + (
            [
                [
                    "1 (during the rounds, kept-alive, every second)",
                    len(scraper.times),
                    round(median(scraper.times), 2),
                    round(max(scraper.times), 2),
                    "-",
                    "/".join(str(s) for s in sorted(scraper.series)),
                    "-",
                    f"{len(scraper.failures)} failed scrapes" if scraper.failures else "-",
                ]
            ]
            if scraper.times
            else []
        ),
    )
    notes = [
        "Two `burrow dev` relays side by side, the same but for `--metrics 127.0.0.1:0` on "
        "one; each with its own agent process (burrow.forward) and an HTTPS tunnel to one "
        "nginx (1 worker). All through the rounds a scraper in the benchmark process GETs the "
        f"metrics relay's /metrics every {SCRAPE_INTERVAL:g} s on one kept-alive connection, "
        "as Prometheus does (at a much shorter interval than its usual 15 s or more). Each "
        "round starts two new relays, the one with metrics first in every other round (an "
        "A/A run of the first design, where the same two relays served every round, found "
        "the second 3% faster with nothing to tell them apart: `--control`), measures each "
        "figure on, off, off, on (off first in the next round), and takes each relay's mean "
        "of its two runs.",
        f"Rate: `h2load --h1 -c {RATE_CONNECTIONS} -m 1 -D {rate_seconds:g}` through the "
        f"tunnel's HTTPS URL (bench/run.py's rate64). Latency: `h2load --h1 -c "
        f"{LATENCY_CONNECTIONS} -m 1 --rps {LATENCY_RATE // LATENCY_CONNECTIONS} -D "
        f"{latency_seconds:g}`, percentiles of every request (its lat1000). Relay CPU per "
        "request is read from /proc over the rate run.",
        f"Scrape: a third relay with metrics (`{' '.join(SCRAPE_RELAY_OPTIONS)}`, lifting "
        f"the per-token creation rate), alone; one agent session opens {FEW_TUNNELS} HTTPS "
        f"tunnels, then an agent process with {MANY_SESSIONS} sessions (a token each) the "
        f"rest, up to {MANY_TUNNELS:,} (bench/scale.py's agent). At each size, {SCRAPES} "
        "GETs of /metrics, each timed from connect to the last byte of the body; "
        "`burrow_relay_tunnels` in the body is checked against the tunnels held. Series: "
        "lines of the body that are not comments.",
        "The targets take, for each round, metrics on / off (on - off for latency) of the "
        "two relays measured back to back, and the median of that over the rounds: drift "
        "between rounds cancels out, and the middle half shows the noise that is left.",
        "Counting runs with or without --metrics (plain integer increments, "
        "relay/metrics.py); the flag adds the listener, a history sample every 5 s and what "
        f"each scrape costs. At one scrape a second that is {few.cpu_ms / 10:.2f}% of a "
        f"core with {few.opened} tunnels and {many.cpu_ms / 10:.2f}% with {many.opened:,} "
        "(relay CPU per scrape above), below what the rounds can resolve. Scrapes during "
        "the rounds wait for a relay busy with h2load's traffic, hence their max.",
        "Machine: {} CPUs ({}); load average {:.2f} {:.2f} {:.2f} at the start, "
        "{:.2f} {:.2f} {:.2f} at the end. Clients, nginx, agents and both relays share "
        "the cores.".format(
            os.cpu_count(), machine.description()["CPU model"], *load_start, *load_end
        ),
        "Raw figures: "
        + json.dumps(
            {k: {m: [round(x, 3) for x in v] for m, v in f.items()} for k, f in figures.items()}
        ),
        f"Run took {budget.elapsed():.1f} s of a {seconds:g} s budget.",
    ]
    if scraper.failures:
        notes.append("Failed scrapes: " + "; ".join(scraper.failures[:5]))
    tables = [targets, side, scrapes]
    rp.emit(args.json, TITLE, tables, notes)


if __name__ == "__main__":
    main()
