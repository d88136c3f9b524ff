"""What the relay's HTTP/2 check costs: throughput and requests/s, inspection on and off.

    python bench/h2_inspection.py --json OUT.json [--budget 120]

Two `burrow dev` relays run side by side, identical but for one thing: the
second is started with BURROW_BENCH_NO_H2_INSPECTION=1, the bench-only switch
that turns off the check of each request's :authority (relay/server.py; a
real relay never sets it). Each has an agent (its own process) forwarding an
`h2_enabled` tunnel to the same nginx, which speaks cleartext HTTP/2. The two
are measured in alternating rounds, so a change in the machine's load hits
both alike:

- requests/s: h2load, 4 connections x 32 streams, GET /small (a 3-byte
  body), for a fixed time each round;
- throughput: curl --http2, one download of /big per round;
- upload: curl --http2, one PUT of a body of the same size (nginx WebDAV).

Run by bench/run.py (its "external" scripts); prints its JSON too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import _relayproc as rp
from procs import HOST, BenchError, free_port, running, tail, wait_port

NGINX = "/usr/sbin/nginx"
# Bytes moved each way per round; a short budget (bench/run.py --quick) moves less.
BIG_SIZE = 512 * 1024 * 1024
SMALL_BUDGET_SIZE = 128 * 1024 * 1024
RATE_CONNECTIONS = 4
RATE_STREAMS = 32
OFF_ENV = "BURROW_BENCH_NO_H2_INSPECTION"
WARM_UP_SECONDS = 0.5

AGENT = r"""
import json, sys
import burrow
with burrow.forward(int(sys.argv[1]), h2_enabled=True) as t:
    print(json.dumps({"host": t.host, "port": t.port}), flush=True)
    sys.stdin.read()
"""


def nginx_config(tmp: Path, port: int) -> str:
    temp_paths = "\n".join(
        f"    {kind}_temp_path {tmp / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root;" if os.geteuid() == 0 else ""
    return f"""
{user}
worker_processes 1;
daemon off;
pid {tmp / "nginx.pid"};
error_log {tmp / "nginx-error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    keepalive_requests 10000000;
    http2_max_requests 10000000;
    client_max_body_size 0;
    client_body_buffer_size 1m;
{temp_paths}
    server {{
        listen {HOST}:{port} http2 backlog=4096;
        root {tmp / "www"};
        location = /small {{ default_type text/plain; return 200 "ok\\n"; }}
        # nginx answers `return` before reading a body and resets the stream, so
        # uploads are PUT as a file (WebDAV) that each round overwrites.
        location /upload/ {{ dav_methods PUT; }}
    }}
}}
"""


@contextlib.contextmanager
def h2c_nginx(tmp: Path, size: int) -> Iterator[int]:
    www = tmp / "www"
    (www / "upload").mkdir(parents=True, exist_ok=True)
    with (www / "big").open("wb") as f:
        f.truncate(size)  # sparse: zeros cost TLS as much as any bytes
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(nginx_config(tmp, port))
    log = tmp / "nginx.log"
    with running([NGINX, "-c", str(conf), "-p", str(tmp)], log) as proc:
        try:
            wait_port(port, proc, log, "nginx (h2c)")
        except BenchError as exc:
            raise BenchError(f"{exc}; error log: {tail(tmp / 'nginx-error.log')}") from None
        yield port


@dataclass
class Setup:
    name: str
    host: str
    port: int
    relay_pid: int

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def connect_to(self) -> str:
        return f"{self.host}:{self.port}:{HOST}:{self.port}"


def start_setup(procs: rp.Processes, name: str, local_port: int, inspect: bool) -> Setup:
    saved = os.environ.pop(OFF_ENV, None)
    if not inspect:
        os.environ[OFF_ENV] = "1"
    try:
        relay = rp.start_relay(procs, name)
    finally:
        os.environ.pop(OFF_ENV, None)
        if saved is not None:
            os.environ[OFF_ENV] = saved
    agent = procs.start(
        f"{name}-agent",
        [sys.executable, "-c", AGENT, str(local_port)],
        env=relay.env,
        stdin=True,
    )
    assert agent.stdout is not None
    line = agent.stdout.readline()
    if not line:
        raise BenchError(f"agent did not start: {procs.log_of(agent)}")
    tunnel = json.loads(line)
    return Setup(name, tunnel["host"], tunnel["port"], relay.pid)


_FINISHED = re.compile(r"finished in [\d.]+\w+, ([\d.]+) req/s")
_STATUS = re.compile(r"status codes: (\d+) 2xx")


def request_rate(setup: Setup, seconds: int) -> float:
    out = subprocess.run(
        [
            "h2load", "-c", str(RATE_CONNECTIONS), "-m", str(RATE_STREAMS),
            "-D", str(seconds), f"--warm-up-time={WARM_UP_SECONDS * 1000:.0f}ms",
            f"--connect-to={HOST}:{setup.port}", f"{setup.url}/small",
        ],
        capture_output=True, text=True, timeout=seconds + 30, check=False,
    ).stdout  # fmt: skip
    finished, status = _FINISHED.search(out), _STATUS.search(out)
    if finished is None or status is None or int(status.group(1)) == 0:
        raise BenchError(f"h2load through {setup.name} gave no result: {out[-400:]}")
    return float(finished.group(1))


CURL_FIGURES = "%{http_version} %{size_download} %{size_upload} %{time_total}"


def transfer(setup: Setup, upload: Path | None, size: int) -> float:
    """Bytes per second of one download of /big, or one upload of ``upload``."""
    args = ["-T", str(upload), f"{setup.url}/upload/body"] if upload else [f"{setup.url}/big"]
    out = subprocess.run(
        [
            "curl", "-sS", "-k", "--http2", "--connect-to", setup.connect_to,
            "-o", "/dev/null", "-w", CURL_FIGURES,
            *args,
        ],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    fields = out.stdout.split()
    if out.returncode != 0 or len(fields) != 4 or fields[0] != "2":
        raise BenchError(f"curl through {setup.name}: {out.stdout} {out.stderr[-300:]}")
    moved = int(fields[2] if upload else fields[1])
    if moved != size:
        raise BenchError(f"curl through {setup.name} moved {moved} bytes, not {size}")
    return moved / float(fields[3])


def main() -> None:
    args = rp.parse_args(__doc__.splitlines()[0] if __doc__ else "")
    budget = rp.Budget(args.budget)
    rp.raise_nofile()
    results: dict[str, dict[str, list[float]]] = {
        name: {k: [] for k in ("rps", "down", "up", "cpu_req", "cpu_down", "cpu_up")}
        for name in ("on", "off")
    }
    rounds = 0
    size = BIG_SIZE if args.budget >= 60 else SMALL_BUDGET_SIZE
    with rp.processes() as procs, h2c_nginx(procs.workdir / "nginx", size) as local_port:
        setups = {
            "on": start_setup(procs, "inspected", local_port, inspect=True),
            "off": start_setup(procs, "uninspected", local_port, inspect=False),
        }
        body = procs.workdir / "body"
        with body.open("wb") as f:
            f.truncate(size)
        rate_seconds = int(max(2, min(5, budget.left() // 40)))  # h2load -D takes whole seconds
        # One round: both setups, each measure; the order flips every round.
        while rounds < 5 and (rounds < 1 or budget.left() > 4 * (rate_seconds + 10)):
            order = ["on", "off"] if rounds % 2 == 0 else ["off", "on"]
            for name in order:
                setup = setups[name]
                figures = results[name]
                cpu = rp.cpu_seconds(setup.relay_pid)
                figures["rps"].append(request_rate(setup, rate_seconds))
                # h2load counts the main period only; the warm-up also cost CPU.
                served = figures["rps"][-1] * (rate_seconds + WARM_UP_SECONDS)
                figures["cpu_req"].append((rp.cpu_seconds(setup.relay_pid) - cpu) / served * 1e6)
                for key, upload in (("down", None), ("up", body)):
                    cpu = rp.cpu_seconds(setup.relay_pid)
                    figures[key].append(transfer(setup, upload, size))
                    spent = rp.cpu_seconds(setup.relay_pid) - cpu
                    figures[f"cpu_{key}"].append(spent / (size / 2**30))
            rounds += 1
    median = {
        name: {k: statistics.median(v) for k, v in figures.items()}
        for name, figures in results.items()
    }

    def row(label: str, key: str, unit: float, fmt: str) -> list[str]:
        on, off = median["on"][key], median["off"][key]
        return [label, fmt.format(off / unit), fmt.format(on / unit), f"{on / off:.2f}"]

    rows = [
        row(
            f"requests/s ({RATE_CONNECTIONS} connections x {RATE_STREAMS} streams, GET /small)",
            "rps",
            1,
            "{:,.0f}",
        ),
        row("download, one stream (MiB/s)", "down", 2**20, "{:,.0f}"),
        row("upload, one stream (MiB/s)", "up", 2**20, "{:,.0f}"),
        row("relay CPU per request (us)", "cpu_req", 1, "{:,.1f}"),
        row("relay CPU per GiB downloaded (s)", "cpu_down", 1, "{:,.2f}"),
        row("relay CPU per GiB uploaded (s)", "cpu_up", 1, "{:,.2f}"),
    ]
    caption = f"HTTP/2 through an h2 tunnel, inspection off and on (median of {rounds} rounds)"
    notes = [
        "Two `burrow dev` relays side by side, one with BURROW_BENCH_NO_H2_INSPECTION=1 "
        "(bench only); each with its own agent process, both to one nginx speaking h2c; "
        f"rounds alternate between them. Requests: h2load -c {RATE_CONNECTIONS} "
        f"-m {RATE_STREAMS} -D {rate_seconds}s; transfers: curl --http2, "
        f"{size // 2**20} MiB each way per round.",
        "Raw figures: " + json.dumps(results),
    ]
    result = rp.table(caption, ["measure", "inspection off", "inspection on", "on / off"], rows)
    rp.write_result(args.json, "HTTP/2 inspection", [result], notes)
    print(json.dumps({"tables": [result], "notes": notes}, indent=2))
    print(f"took {time.monotonic() - budget.start:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
