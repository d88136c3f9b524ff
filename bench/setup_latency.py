"""Tunnel set-up latency: from ``burrow.forward()`` to the first successful request.

Three cases against a `burrow dev` relay in its own process, with a local
HTTP server in another: a live session (the process already forwarded once),
a cold session (new token, so a new session per tunnel), and a new process.
Each request is one HTTPS GET on a fresh TLS connection through the relay.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import _relayproc as rp

import burrow
from burrow.agent import client as agent_client

TITLE = "Tunnel set-up: forward() to the first successful request"

SAMPLES = 200
WARMUP = 5
FRESH_SAMPLES = 20

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


def fresh_child(port: int) -> None:
    """In a new process: time the first forward() and its first 200, print them as JSON."""
    import burrow as fresh_burrow  # already imported; this process did nothing else yet

    ctx = ssl.create_default_context(cafile=sys.argv[3])
    t0 = time.perf_counter()
    with fresh_burrow.forward(port) as tunnel:
        t_enter = time.perf_counter()
        attempts = first_success(ctx, tunnel.port, tunnel.host)
        t_first = time.perf_counter()
    print(json.dumps({"total": t_first - t0, "enter": t_enter - t0, "attempts": attempts}))


def fresh(relay: rp.Relay, port: int, deadline: float) -> Samples:
    samples = Samples()

    def one(_: int) -> None:
        remaining = max(1.0, deadline - time.monotonic() + 5)
        out = subprocess.run(
            [sys.executable, __file__, "--fresh-child", str(port), relay.ca],
            env={**os.environ, **relay.env},
            capture_output=True,
            timeout=remaining,
            check=False,
        )
        if out.returncode != 0:
            samples.failures += 1
            return
        result = json.loads(out.stdout)
        if result["attempts"] > MAX_ATTEMPTS:
            samples.failures += 1
            return
        samples.retries += result["attempts"] - 1
        samples.total.append(result["total"])
        samples.enter.append(result["enter"])

    run_loop(deadline, FRESH_SAMPLES, one)
    return samples


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


def main() -> None:
    args = rp.parse_args(__doc__.splitlines()[0])
    rp.raise_nofile()
    budget = rp.Budget(args.budget)
    notes: list[str] = []
    with rp.processes() as procs:
        relay = rp.start_relay(procs)
        port = rp.start_local_server(procs, "http")
        ctx = ssl.create_default_context(cafile=relay.ca)
        relay_fds = rp.open_fds(relay.pid)
        before = rp.Snapshot.of(relay.pid)

        floor = baseline(relay, ctx, budget.share(0.1))
        started = time.monotonic()
        live_samples = live(relay, port, ctx, budget.share(0.35))
        live_seconds = time.monotonic() - started
        started = time.monotonic()
        cold_samples = cold(relay, port, ctx, budget.share(0.6))
        cold_seconds = time.monotonic() - started
        after = rp.Snapshot.of(relay.pid)
        relay_fds_after = rp.open_fds(relay.pid)
        started = time.monotonic()
        fresh_samples = fresh(relay, port, budget.share(0.9))
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
            s.row("new process: total", fresh_samples.total, None),
            s.row("new process: forward() enter only", fresh_samples.enter, None),
        ],
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
                "new process",
                FRESH_SAMPLES,
                len(fresh_samples.total),
                fresh_samples.failures,
                fresh_samples.retries,
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
        "New process: a new Python process per sample with burrow imported, timed inside "
        "it from forward() (includes starting the agent thread and loading the CA); "
        "interpreter start and imports are not counted.",
        "Baseline: the same request to an unknown name under the relay's domain, which the "
        "relay answers with a 404 itself: the cost of the visitor's TCP + TLS alone.",
        "'extra requests' counts requests that did not return 200 at once (0 expected).",
        f"Run took {budget.elapsed():.1f} s of a {args.budget:g} s budget.",
    ]
    rp.write_result(args.json, TITLE, [latency, runs, relay_table], notes)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--fresh-child"]:
        fresh_child(int(sys.argv[2]))
    else:
        main()
