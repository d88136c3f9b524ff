"""Scale: RSS and CPU of relay and agent under 1,000 concurrent connections and 10,000 idle tunnels.

The relay (`burrow dev`), the agent (a process running burrow.forward()) and
the local echo server each run in their own process, so that /proc gives
each one's figures alone; the visitors are asyncio tasks in this process.
"""

from __future__ import annotations

import asyncio
import collections
import json
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import _relayproc as rp

from burrow.relay.config import MAX_TUNNELS_PER_SESSION

TITLE = "Scale: 1,000 concurrent connections through one tunnel; 10,000 idle tunnels"

CONNECTIONS = 1000
IDLE_TUNNELS = 10_000
TCP_TUNNELS = 1000

# Issue 3's target for relay memory per idle tunnel.
TARGET_BYTES_PER_TUNNEL = 20 * 1024

# A common default soft limit on open files (systemd, most shells); the
# relay needs about two descriptors per visitor, the agent two as well.
DEFAULT_SOFT_NOFILE = 1024

# Options of the relay holding the idle tunnels: every agent session opens
# its 1,000 tunnels at once, far past the default per-token rate limit.
IDLE_RELAY_OPTIONS = ("--tunnel-rate", "1000000")

CONNECT_TIMEOUT = 20.0
IO_TIMEOUT = 20.0
SETTLE_SECONDS = 0.5

Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


# -- 1,000 concurrent connections ------------------------------------------------


class Visitors:
    """N visitors that each echo one message, wait until all N are up, then echo another."""

    def __init__(self, n: int, connect: Connect, on_all_up: Callable[[], None]) -> None:
        self.n = n
        self.connect = connect
        self.on_all_up = on_all_up
        self.errors: collections.Counter[str] = collections.Counter()
        self.first_echo: list[float] = []
        self.completed = 0
        self.established = 0
        self._settled = 0
        self._all_up = asyncio.Event()
        self.all_up_after = 0.0

    def _settle(self) -> None:
        self._settled += 1
        if self._settled == self.n:
            self.all_up_after = time.perf_counter() - self.start
            self.on_all_up()
            self._all_up.set()

    async def _exchange(self, reader: asyncio.StreamReader, writer: Any, text: str) -> None:
        message = text.encode()
        writer.write(message)
        got = await asyncio.wait_for(reader.readexactly(len(message)), IO_TIMEOUT)
        if got != message:
            raise ValueError("echo mismatch")

    async def one(self, i: int) -> None:
        t0 = time.perf_counter()
        writer = None
        try:
            reader, writer = await asyncio.wait_for(self.connect(), CONNECT_TIMEOUT)
            await self._exchange(reader, writer, f"hello {i:05d}\n")
        except Exception as exc:
            self.errors[f"first: {type(exc).__name__}"] += 1
            self._settle()
            if writer is not None:
                writer.close()
            return
        self.first_echo.append(time.perf_counter() - t0)
        self.established += 1
        self._settle()
        try:
            await self._all_up.wait()
            await self._exchange(reader, writer, f"again {i:05d}\n")
            if writer.can_write_eof():  # asyncio's TLS transport cannot half-close
                writer.write_eof()
                if await asyncio.wait_for(reader.read(), IO_TIMEOUT):
                    raise ValueError("bytes after the echo")
            self.completed += 1
        except Exception as exc:
            self.errors[f"second: {type(exc).__name__}"] += 1
        finally:
            writer.close()

    async def run(self) -> None:
        self.start = time.perf_counter()
        await asyncio.gather(*(self.one(i) for i in range(self.n)))
        self.seconds = time.perf_counter() - self.start


async def concurrent_case(
    procs: rp.Processes,
    label: str,
    *,
    tls: bool,
    nofile: int | None,
) -> dict[str, Any]:
    """Relay, echo server and agent processes; CONNECTIONS visitors through one tunnel."""
    relay = rp.start_relay(procs, f"relay-{label}", nofile=nofile)
    echo = rp.start_local_server(procs, "echo")
    agent = rp.start_agent(procs, relay, echo, tcp=not tls, nofile=nofile)
    tunnel = agent.tunnel
    if tls:
        ctx = ssl.create_default_context(cafile=relay.ca)

        def connect() -> Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
            return asyncio.open_connection(
                "127.0.0.1", tunnel["port"], ssl=ctx, server_hostname=tunnel["host"]
            )
    else:

        def connect() -> Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
            return asyncio.open_connection("127.0.0.1", tunnel["tcp_port"])

    pids = {"relay": relay.pid, "agent": agent.pid}
    await asyncio.sleep(SETTLE_SECONDS)  # the agent's pool fills
    before = {name: rp.Snapshot.of(pid) for name, pid in pids.items()}
    overflows = rp.listen_overflows()
    during: dict[str, Any] = {}

    def all_up() -> None:
        for name, pid in pids.items():
            during[name] = (rp.rss_bytes(pid), rp.open_fds(pid))

    peaks = rp.Peaks(pids)
    sampler = asyncio.get_running_loop().create_task(peaks.run())
    visitors = Visitors(CONNECTIONS, connect, all_up)
    await visitors.run()
    sampler.cancel()
    peaks.sample()
    overflows = rp.listen_overflows() - overflows
    await asyncio.sleep(SETTLE_SECONDS)
    after = {name: rp.Snapshot.of(pid) for name, pid in pids.items()}
    hwm = {name: rp.peak_rss_bytes(pid) for name, pid in pids.items()}
    fds_after = {name: rp.open_fds(pid) for name, pid in pids.items()}
    emfile = {
        "relay": rp.count_emfile(procs.log_of(relay.proc)),
        "agent": rp.count_emfile(procs.log_of(agent.proc)),
    }
    result = {
        "label": label,
        "visitors": visitors,
        "before": before,
        "during": during,
        "after": after,
        "fds_after": fds_after,
        "emfile": emfile,
        "peaks": peaks,
        "hwm": hwm,
        "overflows": overflows,
    }
    procs.stop(agent.proc)
    procs.stop(relay.proc)
    return result


def concurrent_rows(result: dict[str, Any]) -> tuple[list[Any], list[list[Any]]]:
    v: Visitors = result["visitors"]
    errors = sum(v.errors.values())
    summary = [
        result["label"],
        v.n,
        v.established,
        v.completed,
        errors,
        "; ".join(f"{k} x{n}" for k, n in sorted(v.errors.items())) or "-",
        round(v.all_up_after, 2),
        rp.ms(rp.percentile(v.first_echo, 50)) if v.first_echo else "-",
        rp.ms(rp.percentile(v.first_echo, 99)) if v.first_echo else "-",
        round(v.seconds, 2),
        result["overflows"],
        "yes" if errors == 0 and v.completed == v.n else "no",
    ]
    rows = []
    for name in ("relay", "agent"):
        before, after = result["before"][name], result["after"][name]
        rss_during, fds_during = result["during"].get(name, ("-", "-"))
        rows.append(
            [
                result["label"],
                name,
                rp.mib(before.rss),
                rp.mib(rss_during) if isinstance(rss_during, int) else "-",
                rp.mib(after.rss),
                rp.mib(result["hwm"][name]),
                round(after.cpu - before.cpu, 2),
                fds_during,
                result["peaks"].fds[name],
                result["fds_after"][name],
                result["emfile"][name],
            ]
        )
    return summary, rows


# -- idle tunnels ----------------------------------------------------------------

# The agent side of the idle-tunnel case, in its own process: one session per
# token (from the environment), then, on "go", tunnels opened on all sessions
# at once, 100 pipelined opens at a time per session; it reports and then
# holds them until its stdin closes.
IDLE_AGENT = r"""
import asyncio, collections, json, os, sys, time
import burrow
from burrow.agent.session import AgentSession

async def main():
    port, tcp = int(sys.argv[1]), sys.argv[2] == "1"
    total, seconds = int(sys.argv[3]), float(sys.argv[4])
    tokens = os.environ["BENCH_TOKENS"].split()
    loop = asyncio.get_running_loop()
    sessions = []
    for token in tokens:
        client = burrow.Client(token=token)
        sessions.append(await AgentSession.connect(client.config()))
    print(json.dumps({"sessions": len(sessions)}), flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    deadline = time.monotonic() + seconds
    opened, errors = [], collections.Counter()

    async def fill(session, count):
        while count > 0 and time.monotonic() < deadline:
            batch = min(count, 100)
            count -= batch
            results = await asyncio.gather(
                *(session.open_tunnel(port, tcp=tcp, h2=False) for _ in range(batch)),
                return_exceptions=True)
            for item in results:
                if isinstance(item, BaseException):
                    errors[type(item).__name__] += 1
                else:
                    opened.append(item)

    per = -(-total // len(sessions))
    counts = [min(per, total - i * per) for i in range(len(sessions))]
    t0 = time.perf_counter()
    await asyncio.gather(*(fill(s, c) for s, c in zip(sessions, counts)))
    took = time.perf_counter() - t0
    sample = [[t.host, t.port] for t in opened[:: max(1, len(opened) // 5)][:5]]
    print(json.dumps({"opened": len(opened), "errors": errors, "seconds": took,
                      "sample": sample}), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    for session in sessions:
        await session.close()

import uvloop
uvloop.run(main())
"""


async def idle_case(
    procs: rp.Processes,
    label: str,
    *,
    tunnels: int,
    tcp: bool,
    seconds: float,
) -> dict[str, Any]:
    """A relay and one agent process holding ``tunnels`` tunnels over several sessions."""
    # The per-token creation rate would make this take minutes: lift it here.
    relay = rp.start_relay(procs, f"relay-{label}", extra=IDLE_RELAY_OPTIONS)
    http_port = rp.start_local_server(procs, "http")
    await asyncio.sleep(SETTLE_SECONDS)
    idle = rp.Snapshot.of(relay.pid)
    per_session = min(1000, MAX_TUNNELS_PER_SESSION)
    n_sessions = -(-tunnels // per_session)
    tokens = " ".join(relay.mint(f"{label}-{i}") for i in range(n_sessions))
    agent = procs.start(
        "idle-agent",
        [
            sys.executable,
            "-c",
            IDLE_AGENT,
            str(http_port),
            "1" if tcp else "0",
            str(tunnels),
            str(seconds),
        ],
        env={**relay.env, "BENCH_TOKENS": tokens},
        stdin=True,
    )
    assert agent.stdin is not None and agent.stdout is not None
    if not agent.stdout.readline():
        raise RuntimeError(f"idle agent failed: {procs.log_of(agent)}")
    await asyncio.sleep(SETTLE_SECONDS)
    with_sessions = rp.Snapshot.of(relay.pid)
    agent_before = rp.rss_bytes(agent.pid)
    agent.stdin.write(b"go\n")
    agent.stdin.flush()
    line = await asyncio.get_running_loop().run_in_executor(None, agent.stdout.readline)
    if not line:
        raise RuntimeError(f"idle agent failed: {procs.log_of(agent)}")
    report = json.loads(line)
    await asyncio.sleep(SETTLE_SECONDS)
    full = rp.Snapshot.of(relay.pid)
    fds_full = rp.open_fds(relay.pid)
    agent_after = rp.rss_bytes(agent.pid)
    errors: collections.Counter[str] = collections.Counter(report["errors"])

    # The tunnels are real: a few of them answer through the relay.
    ctx = ssl.create_default_context(cafile=relay.ca)
    checked = ok = 0
    for host, port in report["sample"]:
        checked += 1
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=host),
                CONNECT_TIMEOUT,
            )
            writer.write(f"GET / HTTP/1.1\r\nhost: {host}\r\n\r\n".encode())
            line = await asyncio.wait_for(reader.readline(), IO_TIMEOUT)
            ok += line.startswith(b"HTTP/1.1 200")
            writer.close()
        except Exception as exc:
            errors[f"check: {type(exc).__name__}"] += 1

    procs.stop(agent)
    procs.stop(relay.proc)
    return {
        "label": label,
        "planned": tunnels,
        "opened": report["opened"],
        "sessions": n_sessions,
        "errors": errors,
        "open_seconds": report["seconds"],
        "idle": idle,
        "with_sessions": with_sessions,
        "full": full,
        "fds_full": fds_full,
        "agent_delta": agent_after - agent_before,
        "checked": checked,
        "ok": ok,
    }


def idle_row(r: dict[str, Any]) -> list[Any]:
    n = r["opened"] or 1
    per_tunnel = (r["full"].rss - r["with_sessions"].rss) / n
    per_tunnel_all = (r["full"].rss - r["idle"].rss) / n
    return [
        r["label"],
        r["planned"],
        r["opened"],
        r["sessions"],
        rp.mib(r["idle"].rss),
        rp.mib(r["with_sessions"].rss),
        rp.mib(r["full"].rss),
        round(per_tunnel),
        round(per_tunnel_all),
        f"<= {TARGET_BYTES_PER_TUNNEL}",
        "yes"
        if per_tunnel_all <= TARGET_BYTES_PER_TUNNEL and r["opened"] == r["planned"]
        else "no",
        round(r["opened"] / r["open_seconds"]) if r["open_seconds"] else "-",
        round(r["full"].cpu - r["with_sessions"].cpu, 2),
        r["fds_full"],
        round(r["agent_delta"] / n),
        f"{r['ok']}/{r['checked']}",
        "; ".join(f"{k} x{c}" for k, c in sorted(r["errors"].items())) or "-",
    ]


# -- main ------------------------------------------------------------------------


async def run(args: Any) -> None:
    budget = rp.Budget(args.budget)
    nofile = rp.raise_nofile()
    notes: list[str] = []
    concurrent: list[dict[str, Any]] = []
    idle: list[dict[str, Any]] = []
    skipped: list[str] = []
    with rp.processes() as procs:
        # The cases the targets are about come first. Each takes a few seconds
        # when all goes well (the soft-limit one about POOL_WAIT_SECONDS more);
        # one that goes badly is cut off when the budget runs out.
        soft = f"raw TCP, soft fd limit {DEFAULT_SOFT_NOFILE}"
        cases: list[tuple[str, float, list[dict[str, Any]], Callable[[], Awaitable[Any]]]] = [
            (
                "raw TCP",
                10,
                concurrent,
                lambda: concurrent_case(procs, "raw TCP", tls=False, nofile=None),
            ),
            (
                "10,000 idle tunnels",
                10,
                idle,
                lambda: idle_case(
                    procs,
                    "HTTPS routes",
                    tunnels=IDLE_TUNNELS,
                    tcp=False,
                    seconds=budget.left() * 0.5,
                ),
            ),
            ("TLS", 15, concurrent, lambda: concurrent_case(procs, "TLS", tls=True, nofile=None)),
            (
                "1,000 TCP tunnels",
                8,
                idle,
                lambda: idle_case(
                    procs,
                    "raw TCP ports",
                    tunnels=TCP_TUNNELS,
                    tcp=True,
                    seconds=budget.left() * 0.5,
                ),
            ),
            (
                soft,
                16,
                concurrent,
                lambda: concurrent_case(procs, soft, tls=False, nofile=DEFAULT_SOFT_NOFILE),
            ),
        ]
        for name, needs, into, case in cases:
            if budget.left() < needs:
                skipped.append(name)
                continue
            try:
                into.append(await asyncio.wait_for(case(), budget.left()))
            except TimeoutError:
                skipped.append(f"{name} (cut off at the end of the budget)")

    summaries, process_rows = [], []
    for result in concurrent:
        summary, rows = concurrent_rows(result)
        summaries.append(summary)
        process_rows += rows
    tables = [
        rp.table(
            f"{CONNECTIONS:,} concurrent connections through one tunnel (target: no error)",
            [
                "visitors",
                "planned",
                "established",
                "completed",
                "errors",
                "error kinds",
                "all up after s",
                "first echo p50 ms",
                "first echo p99 ms",
                "total s",
                "listen overflows",
                "met",
            ],
            summaries,
        ),
        rp.table(
            "Relay and agent processes in those runs (RSS MiB; CPU s over the run)",
            [
                "visitors",
                "process",
                "RSS before",
                "RSS all open",
                "RSS after",
                "RSS peak (VmHWM)",
                "CPU s",
                "fds all open",
                "fds peak",
                "fds after",
                "EMFILE in log",
            ],
            process_rows,
        ),
        rp.table(
            "Idle tunnels on one relay (target: at most 20 KiB = 20480 bytes of relay RSS each)",
            [
                "tunnels",
                "planned",
                "opened",
                "sessions",
                "relay RSS idle MiB",
                "with sessions MiB",
                "with tunnels MiB",
                "bytes/tunnel",
                "bytes/tunnel incl. sessions",
                "target",
                "met",
                "opened/s",
                "relay CPU s",
                "relay fds",
                "agent bytes/tunnel",
                "spot checks 200",
                "errors",
            ],
            [idle_row(r) for r in idle],
        ),
    ]
    notes += [
        f"Open-file limit raised to {nofile} (the hard limit) in this process and in the relay, "
        "agent and echo-server processes, except in the run labelled 'soft fd limit "
        f"{DEFAULT_SOFT_NOFILE}', where relay and agent keep the common default soft limit "
        "(burrow's CLI does not raise it itself).",
        "Visitors: asyncio tasks on uvloop in this process, all started at once; each "
        "echoes one line, waits until every visitor is up (or failed), echoes another, "
        "half-closes and expects EOF. 'all up after' is the time until the last one got its "
        "first echo; RSS 'all open' is sampled at that moment.",
        "Raw TCP visitors connect to the tunnel's TCP port; TLS visitors to the relay's "
        "public port with SNI = the tunnel's name (relay ends TLS). Agent-relay data "
        "connections are TLS in both cases; the echo server runs in its own process.",
        "Idle tunnels: a relay alone (`burrow dev " + " ".join(IDLE_RELAY_OPTIONS) + "`, "
        "lifting the per-token creation rate); one agent process with one session and token "
        "per 1,000 tunnels "
        f"(under MAX_TUNNELS_PER_SESSION={MAX_TUNNELS_PER_SESSION}), opens pipelined 100 at "
        "a time per session. bytes/tunnel = (RSS with tunnels - RSS with "
        "sessions) / tunnels; 'incl. sessions' subtracts the idle relay instead. "
        "HTTPS routes hold no socket; raw TCP tunnels each listen on a port, so that "
        f"variant opens {TCP_TUNNELS:,}.",
        "'agent bytes/tunnel': RSS growth of the agent process per tunnel.",
        "'listen overflows': TcpExt ListenOverflows over the run (whole network namespace, "
        "SYN retransmits included): the relay listens with asyncio's default backlog of 100, "
        "so a burst of 1,000 overflows its accept queues; on loopback this did not slow the "
        "run measurably (CPU for ~1,000 agent-relay TLS data-connection handshakes did).",
        "With a soft limit of 1024 the relay's fd count reaches the limit and nothing is "
        "logged: libuv (uvloop) accepts and closes connections when out of descriptors, so "
        "visitors and the agent's data connections see resets.",
        f"Run took {budget.elapsed():.1f} s of a {args.budget:g} s budget.",
    ]
    if skipped:
        notes.append("Not run for lack of budget: " + ", ".join(skipped) + ".")
    rp.write_result(args.json, TITLE, tables, notes)


def main() -> None:
    args = rp.parse_args(__doc__.splitlines()[0])
    try:
        import uvloop
    except ImportError:
        asyncio.run(run(args))
    else:
        uvloop.run(run(args))


if __name__ == "__main__":
    main()
