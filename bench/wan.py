"""Across distance: burrow against ``ssh -R`` and direct over emulated wide-area paths.

    python bench/wan.py                          # about 90 s; prints Markdown
    python bench/wan.py --quick                  # one short round
    python bench/wan.py --json OUT.json --budget 90   # as bench/run.py runs it

Every setup crosses the same emulated paths (tests/netpath.py: a delaying
TCP forwarder, the round trip of its connect included, a window and a link
rate; this kernel has no netem). All on 127.0.0.1, as the other benchmarks:

- burrow: agent -> [30 ms] -> relay <- [30 ms] <- visitor. ``burrow relay``
  for r1.localhost with ``--public-port`` on the visitors' path, an agent
  process (burrow.forward) forwarding nginx's plain HTTP port; visitors
  speak HTTPS to the relay, which ends TLS;
- ssh -R: ``ssh -N -R`` -> [30 ms] -> sshd <- [30 ms] <- visitor, forwarding
  nginx's TLS port (TLS end to end, the same certificate kind);
- direct: visitor -> [60 ms] -> nginx's TLS port: the machine reached
  straight, over as long a way as visitor-relay-agent, the relay on the way.

Measured round after round, the setups in turn each time:

- time to first byte of a fresh visitor (new TCP and TLS, GET /small) on a
  warm tunnel, ``curl -w %{time_starttransfer}``;
- a burst of 100 fresh visitors at once (asyncio, TLS, GET /small): the time
  until all have their first byte, and errors;
- a page with 30 resources (``/page.html``: 10 stylesheets, 10 scripts, 10
  images) loaded by headless Chromium, a new browser each load:
  ``loadEventEnd`` of the navigation;
- bulk: one HTTPS download over the path, bytes over the time from the first
  byte to the last.

And the fleet's cost: relays at 5, 20 and 50 ms from the agent; the first
forward() of a process with all three as candidates against one with the
5 ms relay alone (p50 of fresh agents, no memory of earlier picks).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import _relayproc as rp
import anchors
import machine
import measure
from anchors import Endpoint
from procs import HOST, BenchError, free_port
from servers import DEV_DOMAIN, SMALL_PATH, TLS_NAME, backends

from burrow import tokens
from burrow.net import devca

TITLE = "Across distance: 30 ms to the relay on each side"
NETPATH = Path(__file__).resolve().parent.parent / "tests" / "netpath.py"

RTT_MS = 30.0  # agent-relay, and visitor-relay
DIRECT_RTT_MS = 2 * RTT_MS  # visitor-machine straight, the relay on the way
# A server's link: one stream over 60 ms moves at most this, or what its windows allow.
RATE_MBIT = 500.0
BURST = 100
PAGE_RESOURCES = 30
TTFB_COUNT = 10
BULK_BYTES = 64 * 1024 * 1024
FLEET_RTTS = (5.0, 20.0, 50.0)
FLEET_TRIALS = 15
DEFAULT_BUDGET = 240.0
QUICK_BUDGET = 60.0
MAX_ROUNDS = 5

SETUPS = ("direct", "ssh", "burrow")
LABELS = {"direct": "direct (60 ms)", "ssh": "ssh -R", "burrow": "burrow (HTTPS)"}


def start_path(procs: rp.Processes, target: int, rtt_ms: float, port: int = 0) -> int:
    """tests/netpath.py from 127.0.0.1:``port`` to ``target``: its port."""
    argv = [sys.executable, str(NETPATH), "--listen", f"{HOST}:{port}"]
    argv += ["--to", f"{HOST}:{target}", "--rtt-ms", f"{rtt_ms:g}", "--rate-mbit", f"{RATE_MBIT:g}"]
    proc = procs.start(f"path-{target}", argv, stdin=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    if not line.startswith("listening "):
        raise BenchError(f"netpath did not start: {procs.log_of(proc)}")
    return int(line.split()[1])


def listening(port: int, proc: subprocess.Popen[bytes], procs: rp.Processes, what: str) -> None:
    deadline = time.monotonic() + rp.START_TIMEOUT
    while True:
        with socket.socket() as probe:
            if probe.connect_ex((HOST, port)) == 0:
                return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"{what} is not listening on {port}: {procs.log_of(proc)[-500:]}")
        time.sleep(0.05)


# -- the setups -------------------------------------------------------------------------


@dataclass
class Relay:
    """A `burrow relay` on loopback behind paths, and what an agent needs to reach it."""

    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    visitor_port: int


def start_relay(
    procs: rp.Processes,
    certs: devca.DevCertificates,
    key: Any,
    name: str,
    agent_rtt: float,
    *,
    domain: str = DEV_DOMAIN,
) -> Relay:
    public = procs.workdir / f"{name}-token.pem"
    tokens.write_public_key(key, public)
    port = free_port()
    visitor = start_path(procs, port, RTT_MS)
    agent = start_path(procs, port, agent_rtt)
    argv = [sys.executable, "-m", "burrow", "relay", "--domain", domain, "--cert", str(certs.cert)]
    argv += ["--key", str(certs.key), "--token-key", str(public), "--listen", f"{HOST}:{port}"]
    argv += ["--public-port", str(visitor), "--state-dir", str(procs.workdir / f"{name}-state")]
    argv += ["--log-level", "warning"]
    proc = procs.start(name, argv)
    listening(port, proc, procs, "burrow relay")
    env = {
        "BURROW_RELAY": f"{domain}:{agent}",
        "BURROW_TOKEN": tokens.mint(key, subject=name, ttl_seconds=3600),
        "BURROW_CA": str(certs.ca_cert),
        "BURROW_AGENT_STATE_DIR": str(procs.workdir / f"{name}-agent"),
    }
    return Relay(proc, env, visitor)


@contextlib.contextmanager
def setups(procs: rp.Processes, back: Any, state: Path) -> Iterator[dict[str, Endpoint]]:
    """The three setups in front of ``back``: visitors' endpoints by setup."""
    ca = back.ca
    direct = start_path(procs, back.tls_port, DIRECT_RTT_MS)
    found = {"direct": Endpoint(f"https://{TLS_NAME}:{direct}", direct, ca)}

    with contextlib.ExitStack() as stack:
        server = stack.enter_context(anchors.sshd(procs.workdir / "sshd"))
        agent_path = start_path(procs, server.port, RTT_MS)
        remote = free_port()
        argv = replace(server, port=agent_path).reverse_argv([(remote, back.tls_port)])
        ssh = procs.start("ssh-R", argv)
        listening(remote, ssh, procs, "ssh -R")
        visitor = start_path(procs, remote, RTT_MS)
        found["ssh"] = Endpoint(f"https://{TLS_NAME}:{visitor}", visitor, ca)

        certs = devca.ensure_dev_certificates(state, DEV_DOMAIN)
        relay = start_relay(procs, certs, tokens.generate_signing_key(), "relay", RTT_MS)
        agent = procs.start(
            "agent",
            [sys.executable, "-c", rp.AGENT, str(back.http_port), "0"],
            env=relay.env,
            stdin=True,
        )
        assert agent.stdout is not None
        line = agent.stdout.readline()
        if not line:
            raise BenchError(f"the agent did not start: {procs.log_of(agent)}")
        host = json.loads(line)["host"]
        found["burrow"] = Endpoint(f"https://{host}:{relay.visitor_port}", relay.visitor_port, ca)
        yield found


# -- measurements -----------------------------------------------------------------------


async def _burst(endpoint: Endpoint, count: int) -> tuple[float, int]:
    """``count`` fresh TLS visitors at once: seconds until the last first byte, errors."""
    context = ssl.create_default_context(cafile=str(endpoint.ca))
    request = f"GET {SMALL_PATH} HTTP/1.1\r\nHost: {endpoint.host}\r\nConnection: close\r\n\r\n"
    started = time.perf_counter()

    async def one() -> float:
        reader, writer = await asyncio.open_connection(
            HOST, endpoint.port, ssl=context, server_hostname=endpoint.host
        )
        try:
            writer.write(request.encode())
            if not await reader.read(1):
                raise ConnectionError("closed before the first byte")
            return time.perf_counter() - started
        finally:
            writer.close()

    results = await asyncio.gather(
        *(asyncio.wait_for(one(), 30) for _ in range(count)), return_exceptions=True
    )
    times = [r for r in results if isinstance(r, float)]
    return (max(times) if times else float("nan")), count - len(times)


def burst(endpoint: Endpoint) -> tuple[float, int]:
    return asyncio.run(_burst(endpoint, BURST))


def bulk(endpoint: Endpoint) -> float:
    """MB/s of one HTTPS download, first byte to last."""
    out = measure.run(
        [
            "curl", "-sS", "-o", "/dev/null", "--http1.1", *endpoint.curl_args(),
            "-w", "%{size_download} %{time_starttransfer} %{time_total}",
            f"{endpoint.url}/bulk",
        ],
        timeout=120,
    )  # fmt: skip
    size, first, total = (float(x) for x in out.split())
    if size != BULK_BYTES:
        raise BenchError(f"downloaded {size:.0f} bytes of {BULK_BYTES}")
    return size / (total - first) / 1e6


def write_page(www: Path) -> None:
    """``/page.html`` and its 30 resources (2 to 40 KiB each) under nginx's root."""
    (www / "r").mkdir(parents=True, exist_ok=True)
    (www / "bulk").write_bytes(os.urandom(BULK_BYTES))
    tags = []
    for i in range(PAGE_RESOURCES):
        size = 2048 + (i * 7919) % (38 * 1024)
        if i % 3 == 0:
            (www / "r" / f"s{i}.css").write_text(f".c{i} {{ color: #123; }}\n/*{'x' * size}*/\n")
            tags.append(f'<link rel="stylesheet" href="/r/s{i}.css">')
        elif i % 3 == 1:
            (www / "r" / f"j{i}.js").write_text(f"window.v{i} = {i};\n//{'y' * size}\n")
            tags.append(f'<script src="/r/j{i}.js"></script>')
        else:
            pad = "z" * size
            svg = f'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><!--{pad}--></svg>'
            (www / "r" / f"i{i}.svg").write_text(svg)
            tags.append(f'<img src="/r/i{i}.svg" width="8" height="8">')
    (www / "page.html").write_text(
        "<!doctype html><html><head><title>30</title>"
        + "".join(t for t in tags if "<link" in t)
        + "</head><body>"
        + "".join(t for t in tags if "<link" not in t)
        + "</body></html>\n"
    )


class Browser:
    """Headless Chromium (selenium, the system chromedriver) that trusts the dev CA."""

    def __init__(self, ca: Path, home: Path) -> None:
        from selenium import webdriver  # the test extras; the bench says when it is missing

        self.webdriver = webdriver
        self.home = home
        nssdb = home / ".pki" / "nssdb"
        nssdb.mkdir(parents=True, exist_ok=True)
        certutil = shutil.which("certutil")
        if certutil is None:
            raise BenchError("certutil (libnss3-tools) is missing")
        subprocess.run([certutil, "-N", "-d", f"sql:{nssdb}", "--empty-password"], check=True)
        subprocess.run(
            [certutil, "-A", "-d", f"sql:{nssdb}", "-n", "dev CA", "-t", "C,,", "-i", str(ca)],
            check=True,
        )

    def load(self, url: str) -> tuple[float, int]:
        """A new browser loads ``url``: ms to loadEventEnd, and resources fetched."""
        from selenium.webdriver.chrome.service import Service

        options = self.webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "chromium"
        for flag in (
            "--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--disable-background-networking", "--disable-component-update",
        ):  # fmt: skip
            options.add_argument(flag)
        if os.geteuid() == 0:
            options.add_argument("--no-sandbox")  # Chromium's sandbox refuses to run as root
        service = Service(
            executable_path=shutil.which("chromedriver") or "chromedriver",
            env={**os.environ, "HOME": str(self.home)},
        )
        driver = self.webdriver.Chrome(options=options, service=service)
        try:
            driver.set_page_load_timeout(60)
            driver.get(url)
            got = driver.execute_script(
                "const n = performance.getEntriesByType('navigation')[0];"
                "const r = performance.getEntriesByType('resource')"
                "  .filter(e => e.responseEnd > 0 && (e.responseStatus || 200) === 200);"
                "return [n.loadEventEnd, r.length];"
            )
        finally:
            driver.quit()
        return float(got[0]), int(got[1])


# -- the fleet: three candidates against one --------------------------------------------

FIRST_FORWARD = r"""
import json, os, sys, time
import burrow
from burrow.agent.client import runtime
port, relays, base, trials = int(sys.argv[1]), sys.argv[2].split(";"), sys.argv[3], int(sys.argv[4])
times = {r: [] for r in relays}
for i in range(trials):
    for r in relays if i % 2 else reversed(relays):
        os.environ["BURROW_AGENT_STATE_DIR"] = os.path.join(base, f"{i}-{r.count(',')}")
        client = burrow.Client(relay=r)
        started = time.perf_counter()
        with burrow.forward(port, client=client):
            times[r].append((time.perf_counter() - started) * 1000)
        runtime.run(runtime.close_all())
        time.sleep(0.2)  # the losers' handshakes end
print(json.dumps(times), flush=True)
"""


def first_forward(procs: rp.Processes, state: Path, http_port: int, trials: int) -> dict[str, Any]:
    domains = [f"f{i}.localhost" for i in range(len(FLEET_RTTS))]
    certs = []
    root = procs.workdir / "fleet-certs"
    for i, domain in enumerate(domains):
        where = root / domain
        if i:
            where.mkdir(parents=True, exist_ok=True)
            for name in (devca.CA_CERT_FILE, devca.CA_KEY_FILE):
                shutil.copy2(root / domains[0] / name, where / name)
        certs.append(devca.ensure_dev_certificates(where, domain))
    key = tokens.generate_signing_key()
    relays = [
        start_relay(procs, c, key, f"fleet{i}", rtt, domain=d)
        for i, (c, rtt, d) in enumerate(zip(certs, FLEET_RTTS, domains, strict=True))
    ]
    nearest = relays[0].env["BURROW_RELAY"]
    everyone = ",".join(r.env["BURROW_RELAY"] for r in reversed(relays))
    env = {**relays[0].env, "BURROW_RELAY": ""}
    argv = [sys.executable, "-c", FIRST_FORWARD, str(http_port), f"{nearest};{everyone}"]
    agent = procs.start(
        "first-forward", [*argv, str(procs.workdir / "fleet-agent"), str(trials)], env=env
    )
    assert agent.stdout is not None
    line = agent.stdout.readline()
    if not line:
        raise BenchError(f"first forward(): {procs.log_of(agent)}")
    times = json.loads(line)
    for relay in relays:
        procs.stop(relay.proc)
    return {"one": times[nearest], "three": times[everyone]}


# -- the run ----------------------------------------------------------------------------


@dataclass
class Figures:
    ttfb: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SETUPS})
    burst: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SETUPS})
    burst_errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SETUPS, 0))
    page: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SETUPS})
    page_short: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SETUPS, 0))
    bulk: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SETUPS})
    problems: list[str] = field(default_factory=list)


def one_round(endpoints: dict[str, Endpoint], browser: Browser | None, got: Figures) -> None:
    for name, endpoint in endpoints.items():
        try:
            got.ttfb[name].append(measure.fresh_tls_ttfb(endpoint, TTFB_COUNT).p50_ms)
            seconds, errors = burst(endpoint)
            got.burst[name].append(seconds * 1000)
            got.burst_errors[name] += errors
            if browser is not None:
                ms, fetched = browser.load(f"{endpoint.url}/page.html")
                got.page[name].append(ms)
                got.page_short[name] += PAGE_RESOURCES - fetched
            got.bulk[name].append(bulk(endpoint))
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            got.problems.append(f"{name}: {exc}")
            print(f"  {name}: FAILED {exc}", file=sys.stderr)
        print(f"  {name}: done", file=sys.stderr)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(value: float | None, pattern: str = "{:.1f}") -> str:
    return "-" if value is None else pattern.format(value)


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="Where to write the result (default: Markdown).")
    parser.add_argument("--budget", type=float, help="Seconds the whole run may take.")
    parser.add_argument("--quick", action="store_true", help="one short round")
    parser.add_argument("--rounds", type=int, default=MAX_ROUNDS, help="at most this many rounds")
    args = parser.parse_args()
    seconds = args.budget or (QUICK_BUDGET if args.quick else DEFAULT_BUDGET)
    budget = rp.Budget(seconds)
    rp.raise_nofile()
    os.environ["PATH"] = machine.PATH
    load_start = os.getloadavg()
    got = Figures()
    fleet: dict[str, Any] | None = None
    rounds = 0
    with rp.processes() as procs:
        procs.workdir.chmod(0o755)  # nginx's worker reads the files below
        state = procs.workdir / "state"
        with backends(procs.workdir / "backends", state, 1024) as back:
            write_page(procs.workdir / "backends" / "www")
            browser: Browser | None = None
            try:
                browser = Browser(back.ca, procs.workdir / "home")
            except (ImportError, BenchError, OSError, subprocess.SubprocessError) as exc:
                got.problems.append(f"no page loads: {exc}")
            with setups(procs, back, state) as endpoints:
                round_seconds = 0.0
                while rounds < (1 if args.quick else args.rounds) and (
                    rounds == 0 or budget.left() > round_seconds + 25
                ):
                    started = time.monotonic()
                    one_round(endpoints, browser, got)
                    round_seconds = time.monotonic() - started
                    rounds += 1
                    print(f"round {rounds}: {round_seconds:.1f}s", file=sys.stderr)
            trials = 5 if args.quick or budget.left() < 40 else FLEET_TRIALS
            try:
                fleet = first_forward(procs, state, back.http_port, trials)
            except BenchError as exc:
                got.problems.append(f"first forward(): {exc}")
    load_end = os.getloadavg()

    rows = []
    for name in SETUPS:
        rows.append(
            [
                LABELS[name],
                fmt(median(got.ttfb[name])),
                fmt(median(got.burst[name]), "{:.0f}"),
                str(got.burst_errors[name]),
                fmt(median(got.page[name]), "{:.0f}"),
                fmt(median(got.bulk[name])),
            ]
        )
    table = rp.table(
        f"Medians of {rounds} round{'s' if rounds != 1 else ''}: 30 ms agent-relay and "
        f"30 ms visitor-relay, links of {RATE_MBIT:g} Mbit/s",
        [
            "setup",
            "fresh visitor TTFB p50 (ms)",
            f"{BURST} at once: all first bytes (ms)",
            "errors",
            f"page of {PAGE_RESOURCES} resources, Chromium (ms)",
            "one stream (MB/s)",
        ],
        rows,
    )
    b, s = "burrow", "ssh"

    def verdict(met: bool | None) -> str:
        return "-" if met is None else ("yes" if met else "**no**")

    def at_most(x: float | None, y: float | None, factor: float = 1.0) -> bool | None:
        return None if x is None or y is None else x <= factor * y

    tb, ts = median(got.ttfb[b]), median(got.ttfb[s])
    bb, bs = median(got.burst[b]), median(got.burst[s])
    pb, ps = median(got.page[b]), median(got.page[s])
    targets = rp.table(
        "Targets (issue 13): burrow / ssh -R",
        ["what", "target", "measured", "met?"],
        [
            ["fresh visitor's first byte", "<= 1.00", ratio(tb, ts), verdict(at_most(tb, ts))],
            [
                f"burst of {BURST}: all served, no error",
                "<= 1.50, 0 errors",
                f"{ratio(bb, bs)}, {got.burst_errors[b]} errors",
                verdict(
                    None
                    if at_most(bb, bs, 1.5) is None
                    else bool(at_most(bb, bs, 1.5)) and got.burst_errors[b] == 0
                ),
            ],
            ["page load", "<= 1.00", ratio(pb, ps), verdict(at_most(pb, ps))],
            [
                "one stream (higher is better)",
                "-",
                ratio(median(got.bulk[b]), median(got.bulk[s])),
                "-",
            ],
        ],
    )
    tables = [targets, table]
    if fleet is not None:
        one, three = median(fleet["one"]), median(fleet["three"])
        added = None if one is None or three is None else three - one
        tables.append(
            rp.table(
                "The first forward() of an agent: three candidates (5, 20, 50 ms) against "
                "the 5 ms relay alone (p50, no memory of earlier picks)",
                ["candidates", "trials", "p50 (ms)", "target", "met?"],
                [
                    ["the 5 ms relay alone", len(fleet["one"]), fmt(one), "-", "-"],
                    [
                        "all three",
                        len(fleet["three"]),
                        fmt(three),
                        "<= +5 ms",
                        verdict(None if added is None else added <= 5),
                    ],
                ],
            )
        )
    notes = [
        "All on 127.0.0.1; each path is tests/netpath.py, a user-space forwarder (this "
        "kernel has no netem) that delays every chunk by half the RTT each way, makes a "
        "new connection cost its handshake's round trip, bounds bytes in flight to a 4 MiB "
        f"window per direction and paces a {RATE_MBIT:g} Mbit/s link. It models no loss and no "
        "slow start.",
        "burrow: `burrow relay` (r1.localhost, --public-port on the visitors' path), one agent "
        "process (burrow.forward) to nginx's plain HTTP port; visitors speak HTTPS to the "
        "relay. ssh -R: Debian's sshd and `ssh -N -R` through the agent's path, to nginx's "
        "TLS port (TLS end to end). Direct: nginx's TLS port over one 60 ms path.",
        f"TTFB: {TTFB_COUNT} curl processes one after another (new TCP and TLS each), p50 "
        f"of each round. Burst: {BURST} asyncio TLS visitors started at once in this process, "
        "GET /small each, time until the last first byte. Page: a new headless Chromium per "
        "load (selenium), loadEventEnd of /page.html (10 stylesheets, 10 scripts, 10 SVG "
        "images, 2 to 40 KiB), HTTP/1.1 everywhere. One stream: curl downloads a 64 MiB "
        "file, bytes over the time from first byte to last.",
        "Where burrow's first byte comes from: the relay ends the visitor's TLS, 30 ms "
        "away, and sends the request down a data connection the agent opened before "
        "(TCP 30 + TLS 30 + request 60 = 120 ms); through ssh -R and direct, TLS runs end to "
        "end over 60 ms, and ssh -R also opens a channel for each visitor.",
        "First forward(): one process, each trial with a fresh agent state dir and its "
        "sessions closed after; relays at 5, 20 and 50 ms listed farthest first.",
        "Machine: {} CPUs; load average {:.2f} {:.2f} {:.2f} at the start, {:.2f} {:.2f} "
        "{:.2f} at the end. Paths, relay, agent, sshd, nginx and clients share the cores.".format(
            os.cpu_count(), *load_start, *load_end
        ),
        "Raw figures: "
        + json.dumps(
            {
                name: {k: [round(x, 1) for x in v] for k, v in values.items()}
                for name, values in (
                    ("ttfb", got.ttfb),
                    ("burst", got.burst),
                    ("page", got.page),
                    ("bulk", got.bulk),
                    ("first_forward", fleet or {}),
                )
            }
        ),
        f"Run took {budget.elapsed():.1f} s of a {seconds:g} s budget.",
    ]
    notes += [f"Problem: {p}" for p in got.problems]
    rp.emit(args.json, TITLE, tables, notes)


if __name__ == "__main__":
    main()
