"""Readiness: wait until the server behind a forwarded port accepts connections.

A tunnel is published as soon as ``forward()`` returns, often before the
local server listens; visitors that come too early get a clean close. These
probes let a program wait for the server instead: a TCP connect to the
local port, or, with ``http_path``, an HTTP/1.1 GET that must get an answer
below 500. The probe talks to this machine only, as the agent does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Final

from burrow.exception import InvalidError, NotReadyError

# The addresses the agent dials for a tunnel's local port, in its order.
LOCAL_HOSTS: Final = ("127.0.0.1", "::1")

# Probe schedule: first again after 10 ms (servers often start within a few),
# then doubling up to a quarter second, which bounds the wait added after
# the server is up without polling a slow starter (Jupyter: seconds) hard.
FIRST_DELAY: Final = 0.01
MAX_DELAY: Final = 0.25

# One probe's budget. Loopback connects answer at once unless the accept
# queue is full; an HTTP answer may take a while on a server still warming up.
PROBE_TIMEOUT: Final = 5.0

# An HTTP status line longer than this is not one.
MAX_STATUS_LINE: Final = 4096


def http_request(path: str, port: int) -> bytes:
    """The probe's request: a GET of ``path`` that asks the server to close after answering."""
    if not path.startswith("/") or any(c in path for c in " \r\n\t"):
        raise InvalidError(f"http_path must be a path like '/health', not {path!r}")
    return (
        f"GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\n"
        "User-Agent: burrow-readiness\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    ).encode("ascii")


def parse_status(data: bytes) -> int | None:
    """The status code of an HTTP/1.x answer; ``None`` while the status line is incomplete.

    Raises ``ValueError`` for bytes that are not an HTTP/1.x status line.
    """
    line, sep, _ = data.partition(b"\r\n")
    if not sep:
        if len(data) > MAX_STATUS_LINE:
            raise ValueError("no HTTP status line")
        # Reject early what cannot become one (a TLS alert, a banner).
        if not b"HTTP/1.".startswith(data[:7]):
            raise ValueError(f"not an HTTP/1.x answer: {data[:40]!r}")
        return None
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP/1.x status line: {line[:80]!r}")
    status = int(parts[1])
    if not 100 <= status <= 999:
        raise ValueError(f"bad HTTP status {status}")
    return status


async def probe(
    port: int, http_path: str | None = None, budget: float = PROBE_TIMEOUT
) -> str | None:
    """One attempt: ``None`` if the server is ready, else why it is not."""
    reasons: list[str] = []
    for host in LOCAL_HOSTS:
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(budget):
                reader, writer = await asyncio.open_connection(host, port)
                if http_path is None:
                    return None
                writer.write(http_request(http_path, port))
                data = b""
                while (status := parse_status(data)) is None:
                    chunk = await reader.read(4096)
                    if not chunk:
                        raise ConnectionResetError("closed the connection without answering")
                    data += chunk
            if status < 500:
                return None
            return f"GET {http_path} answered {status}"
        except TimeoutError:
            reasons.append(f"no answer on {host} within {budget:g}s")
        except ValueError as exc:
            return f"GET {http_path}: {exc}"
        except ConnectionRefusedError:
            reasons.append(f"connection refused on {host}")
        except OSError as exc:
            reasons.append(f"{host}: {exc.strerror or exc}")
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    return "; ".join(reasons)


async def wait_ready(
    port: int,
    *,
    timeout: float,  # noqa: ASYNC109 - the public API's name; the deadline is ours to keep
    http_path: str | None = None,
    url: str | None = None,
    gone: Callable[[], str | None] | None = None,
) -> None:
    """Probe until the server is ready; raise :class:`NotReadyError` after ``timeout`` seconds.

    ``gone`` is asked before each probe; if it returns a reason (the
    process that should serve the port has ended, say), the wait stops at
    once with that reason instead of running out the clock.
    """
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout < 0:
        raise InvalidError(f"timeout must be a number of seconds >= 0, not {timeout!r}")
    if http_path is not None:
        http_request(http_path, port)  # check the path before waiting
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = FIRST_DELAY
    last: str | None = None
    while True:
        if gone is not None and (why := gone()) is not None:
            raise NotReadyError(port, url, timeout, why)
        budget = max(min(PROBE_TIMEOUT, deadline - loop.time()), 0.001)
        reason = await probe(port, http_path, budget)
        if reason is None:
            return
        # A probe cut short by the deadline says less than the one before it.
        if last is None or budget >= PROBE_TIMEOUT or "no answer" not in reason:
            last = reason
        reason = last
        left = deadline - loop.time()
        if left <= 0:
            raise NotReadyError(port, url, timeout, reason)
        await asyncio.sleep(min(delay, left))
        delay = min(delay * 2, MAX_DELAY)
