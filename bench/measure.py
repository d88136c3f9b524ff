"""One measurement each: iperf3, curl downloads, h2load latency and rate, fresh-TLS TTFB.

Every function runs real client tools against an :class:`anchors.Setup` and
returns plain numbers; any failure is a :class:`procs.BenchError`.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from anchors import Endpoint
from procs import HOST, BenchError, cpu_seconds, run
from servers import BIG_PATH, SMALL_PATH

GIB = 1024**3


@dataclass(frozen=True)
class Bulk:
    gbit_s: float
    cpu_s_per_gib: float | None
    """CPU seconds the tunnel's processes spent per GiB carried (None without processes)."""


def _cpu_per_gib(pids: tuple[int, ...], before: float, nbytes: float) -> float | None:
    if not pids or nbytes <= 0:
        return None
    return (cpu_seconds(pids) - before) / (nbytes / GIB)


def iperf3(port: int, streams: int, seconds: float, pids: tuple[int, ...] = ()) -> Bulk:
    """iperf3 client to server through ``port`` (data flows from visitor to local server)."""
    # iperf3 -s serves one test at a time and learns late that the last one
    # ended when a tunnel holds the connection open a little: wait for it.
    for _ in range(IPERF_BUSY_RETRIES):
        try:
            return _iperf3_once(port, streams, seconds, pids)
        except BenchError as exc:
            if "busy" not in str(exc):
                raise
            time.sleep(0.5)
    return _iperf3_once(port, streams, seconds, pids)


# Half-second waits for an iperf3 server still busy with the previous test.
IPERF_BUSY_RETRIES = 20


def _iperf3_once(port: int, streams: int, seconds: float, pids: tuple[int, ...]) -> Bulk:
    before = cpu_seconds(pids) if pids else 0.0
    out = run(
        [
            "iperf3",
            "-c",
            HOST,
            "-p",
            str(port),
            "-P",
            str(streams),
            "-t",
            str(seconds),
            "-J",
        ],
        timeout=seconds + 20,
    )
    try:
        data = json.loads(out)
    except ValueError as exc:
        raise BenchError(f"iperf3 gave no JSON: {out[-200:]}") from exc
    if "error" in data:
        raise BenchError(f"iperf3: {data['error']}")
    try:
        end = data["end"]["sum_received"]
    except KeyError as exc:
        raise BenchError(f"iperf3 gave no result: {out[-200:]}") from exc
    return Bulk(end["bits_per_second"] / 1e9, _cpu_per_gib(pids, before, end["bytes"]))


def download(
    endpoint: Endpoint,
    size: int,
    streams: int,
    *,
    file_size: int,
    pids: tuple[int, ...] = (),
    timeout: float = 120,
) -> Bulk:
    """GET ``size`` bytes of the big file with curl, split over ``streams`` parallel ranges."""
    url = endpoint.url + BIG_PATH
    part = size // streams
    procs: list[subprocess.Popen[str]] = []
    before = cpu_seconds(pids) if pids else 0.0
    start = time.perf_counter()
    try:
        for i in range(streams):
            first, last = i * part, (size - 1 if i == streams - 1 else (i + 1) * part - 1)
            argv = ["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download}"]
            if streams > 1 or size != file_size:
                argv += ["-r", f"{first}-{last}"]
            procs.append(
                subprocess.Popen(
                    [*argv, *endpoint.curl_args(), url],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    start_new_session=True,
                )
            )
        got = 0
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, timeout - (time.perf_counter() - start)))
            if proc.returncode != 0:
                raise BenchError(f"curl exited with {proc.returncode}: {err.strip()}")
            got += int(out.strip() or 0)
        elapsed = time.perf_counter() - start
    except subprocess.TimeoutExpired:
        raise BenchError(f"download took longer than {timeout:.0f}s") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if got != size:
        raise BenchError(f"downloaded {got} bytes, expected {size}")
    return Bulk(size * 8 / elapsed / 1e9, _cpu_per_gib(pids, before, size))


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p99_ms: float
    p999_ms: float
    rate: float
    """Requests per second actually completed."""


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(0, min(len(sorted_values) - 1, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def latency(endpoint: Endpoint, rate: int, connections: int, seconds: float) -> Latency:
    """Small requests on kept-alive connections at a fixed total ``rate`` (h2load --rps)."""
    with tempfile.TemporaryDirectory(prefix="burrow-bench-h2load-") as tmp:
        log = Path(tmp) / "requests.log"
        run(
            [
                "h2load",
                "--h1",
                "-c",
                str(connections),
                "-m",
                "1",
                f"--rps={rate / connections:g}",
                "-D",
                f"{seconds:g}",
                "--warm-up-time=500ms",
                f"--log-file={log}",
                *endpoint.h2load_args(),
                endpoint.url + SMALL_PATH,
            ],
            timeout=seconds + 30,
        )
        # One line per request: start (us since the epoch), status, duration (us).
        durations: list[float] = []
        bad = 0
        for line in log.read_text().splitlines():
            fields = line.split()
            if len(fields) < 3:
                continue
            if fields[1] != "200":
                bad += 1
            durations.append(int(fields[2]) / 1000)
    if not durations:
        raise BenchError("h2load completed no request")
    if bad > len(durations) // 100:
        raise BenchError(f"{bad} of {len(durations)} requests failed")
    durations.sort()
    return Latency(
        p50_ms=_percentile(durations, 0.50),
        p99_ms=_percentile(durations, 0.99),
        p999_ms=_percentile(durations, 0.999),
        rate=len(durations) / seconds,
    )


_FINISHED = re.compile(r"finished in [\d.]+\w+, ([\d.]+) req/s")
_REQUESTS = re.compile(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded")


def max_rate(endpoint: Endpoint, connections: int, seconds: float) -> float:
    """Highest request rate on ``connections`` kept-alive connections (h2load, no --rps)."""
    out = run(
        [
            "h2load",
            "--h1",
            "-c",
            str(connections),
            "-m",
            "1",
            "-D",
            f"{seconds:g}",
            "--warm-up-time=500ms",
            *endpoint.h2load_args(),
            endpoint.url + SMALL_PATH,
        ],
        timeout=seconds + 30,
    )
    finished, requests = _FINISHED.search(out), _REQUESTS.search(out)
    if finished is None or requests is None:
        raise BenchError(f"h2load gave no result: {out[-300:]}")
    total, succeeded = int(requests.group(1)), int(requests.group(2))
    if total == 0 or succeeded < total * 0.99:
        raise BenchError(f"only {succeeded} of {total} requests succeeded")
    return float(finished.group(1))


@dataclass(frozen=True)
class Ttfb:
    p50_ms: float
    p99_ms: float


def fresh_tls_ttfb(endpoint: Endpoint, count: int) -> Ttfb:
    """Time to first byte of ``count`` sequential fresh TLS connections (one curl each).

    Each curl is a new process, so nothing (not even a TLS session) is reused.
    """
    url = endpoint.url + SMALL_PATH
    times: list[float] = []
    for _ in range(count):
        out = run(
            [
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{time_starttransfer}",
                "--http1.1",
                *endpoint.curl_args(),
                url,
            ],
            timeout=20,
        )
        times.append(float(out.strip()) * 1000)
    times.sort()
    return Ttfb(p50_ms=statistics.median(times), p99_ms=_percentile(times, 0.99))


@dataclass(frozen=True)
class Burst:
    seconds: float
    """From the first connect until the last connection had its first byte of reply."""
    errors: int
    """Connections that got no complete 200."""


_FIRST_BYTE = re.compile(r"time to 1st byte:\s+\S+\s+(\d+(?:\.\d+)?)(us|ms|s)\b")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def burst(endpoint: Endpoint, connections: int, timeout: float = 60) -> Burst:
    """``connections`` fresh connections opened at once, one GET ``/small`` on each.

    h2load starts every connection in the same instant (one client each,
    one request each, nothing reused, no TLS session resumed); the figure
    is the slowest connection's time from its connect to its first byte.
    """
    out = run(
        [
            "h2load",
            "--h1",
            "-c",
            str(connections),
            "-n",
            str(connections),
            "-m",
            "1",
            *endpoint.h2load_args(),
            endpoint.url + SMALL_PATH,
        ],
        timeout=timeout,
    )
    first, requests = _FIRST_BYTE.search(out), _REQUESTS.search(out)
    if requests is None:
        raise BenchError(f"h2load gave no result: {out[-300:]}")
    succeeded = int(requests.group(2))
    if first is None or succeeded == 0:
        raise BenchError(f"no connection of the burst got a reply: {out[-300:]}")
    return Burst(float(first.group(1)) * _UNITS[first.group(2)], connections - succeeded)
