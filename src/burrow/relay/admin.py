"""The operator's listener: Prometheus metrics, health checks, the admin API, the dashboard.

``burrow relay --metrics HOST:PORT`` serves, on one plain-HTTP port meant for
a private network or loopback:

- ``/metrics`` (Prometheus text), ``/healthz`` and ``/readyz``, open to all;
- ``/api/...`` (JSON), behind the bearer token of ``--admin-token-file``;
- ``/`` the dashboard, a static page that reads the API.

The figures come from :class:`Processes`: this process alone, or with
``--workers N`` every worker, asked over a Unix socket at each request and
summed (:class:`WorkerProcesses`). HTTP is parsed by h11; what a peer may
hold here is bounded like the relay's public port: connections (the oldest
goes past the cap), time to send a request, and its size.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final, Protocol

import h11
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest

from burrow import tokens
from burrow.exception import Error, InvalidError
from burrow.relay import metrics, observe
from burrow.relay.logs import BoundedLog
from burrow.relay.metrics import FAMILIES, Samples

log = logging.getLogger("burrow.relay")

# Connections to the listener at once; past it the oldest is closed. A
# Prometheus server keeps one, a dashboard a few, the CLI one per command.
MAX_CONNECTIONS: Final = 64

# Seconds a client has to send each request (its head and body), and to let an
# idle kept-alive connection wait for the next: a slow or silent peer is closed.
REQUEST_TIMEOUT: Final = 10.0

# A request's head (line and headers) and body; the API takes small JSON bodies.
MAX_HEAD_BYTES: Final = 16 * 1024
MAX_BODY_BYTES: Final = 16 * 1024

# The dashboard's history: one sample of the relay's counts every
# HISTORY_INTERVAL seconds over the last ten minutes.
HISTORY_INTERVAL: Final = 5.0
HISTORY_SAMPLES: Final = 120

# How long the serving worker waits for another's answer before leaving it out.
WORKER_ANSWER_TIMEOUT: Final = 5.0
# A worker's answer (its sessions and tunnels as JSON) is at most this big.
WORKER_ANSWER_MAX_BYTES: Final = 256 * 1024 * 1024

# What generate_latest writes: the classic text format, which every Prometheus reads.
PROMETHEUS_TEXT: Final = "text/plain; version=0.0.4; charset=utf-8"

_STATIC: Final = {
    "/": ("dashboard.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}

# Nothing on the page comes from elsewhere, and nothing else may frame it.
_PAGE_HEADERS: Final = (
    (
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, or ``localhost``) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_listen(host: str, admin_token: str | None) -> None:
    """Refuse to serve the admin API beyond this machine without a token (InvalidError)."""
    if admin_token is None and not is_loopback(host):
        raise InvalidError(
            f"--metrics {host}: the admin API on an address other machines can reach "
            "needs --admin-token-file (or listen on 127.0.0.1 and put a proxy in front)"
        )


def read_admin_token(path: Path) -> str:
    """The bearer token in ``path``: its first line, stripped; at least 16 characters."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidError(f"cannot read the admin token file {path}: {exc}") from exc
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if len(token) < 16 or not token.isascii() or not token.isprintable():
        raise InvalidError(
            f"the admin token in {path} must be one line of at least 16 printable ASCII "
            "characters (make one with: openssl rand -hex 32)"
        )
    return token


# -- where the figures come from ---------------------------------------------------


class Processes(Protocol):
    """The relay's processes, as the listener asks them: one, or every worker."""

    @property
    def count(self) -> int:
        """Relay processes there are (answering or not)."""

    def local(self) -> Any:
        """This process's :class:`~burrow.relay.server.Relay`."""

    async def ask(self, op: str, arg: str = "") -> list[Any]:
        """Every live process's answer to ``op`` (see :func:`answer`)."""


def answer(relay: Any, op: str, arg: str, worker: int) -> Any:
    """One process's answer to a question from the listener (JSON)."""
    if op == "samples":
        return {"pid": os.getpid(), "worker": worker, "samples": observe.samples(relay)}
    if op == "sessions":
        return observe.sessions(relay, worker)
    if op == "tunnels":
        return observe.tunnels(relay, worker)
    if op == "refusals":
        return observe.refusals(relay)
    if op == "end-session":
        return observe.end_session(relay, arg)
    if op == "revoked":
        return observe.apply_revocations(relay, arg)
    raise ValueError(f"unknown question {op!r}")


class LocalProcess:
    """A relay that is one process."""

    def __init__(self, relay: Any) -> None:
        self.relay = relay
        self.count = 1

    def local(self) -> Any:
        return self.relay

    async def ask(self, op: str, arg: str = "") -> list[Any]:
        return [answer(self.relay, op, arg, 0)]


class WorkerProcesses:
    """Worker 0 of ``count``: asks the others over their Unix sockets in ``directory``.

    A worker that does not answer is left out: its gauges no longer count.
    Its counters do, at their last value, so that sums never go down while a
    worker restarts; a restarted worker (a new pid) starts from zero on top.
    """

    def __init__(self, relay: Any, index: int, count: int, directory: Path) -> None:
        self.relay = relay
        self.index = index
        self.count = count
        self.directory = directory
        self._last: dict[int, dict[str, Any]] = {}  # worker -> its last samples answer
        self._retired: list[Samples] = []  # counters of workers that were replaced

    def local(self) -> Any:
        return self.relay

    async def ask(self, op: str, arg: str = "") -> list[Any]:
        others = [i for i in range(self.count) if i != self.index]
        answers = await asyncio.gather(*(self._ask_worker(i, op, arg) for i in others))
        mine = answer(self.relay, op, arg, self.index)
        got = [mine, *(a for a in answers if a is not None)]
        if op == "samples":
            return self._with_retired(got)
        return got

    async def _ask_worker(self, index: int, op: str, arg: str) -> Any:
        path = worker_socket(self.directory, index)
        try:
            async with asyncio.timeout(WORKER_ANSWER_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(
                    str(path), limit=WORKER_ANSWER_MAX_BYTES
                )
                try:
                    writer.write(json.dumps({"op": op, "arg": arg}).encode() + b"\n")
                    line = await reader.readline()
                finally:
                    writer.close()
            return json.loads(line) if line else None
        except (OSError, TimeoutError, ValueError, asyncio.LimitOverrunError) as exc:
            log.debug("worker %d did not answer %s: %s", index, op, exc)
            return None

    def _with_retired(self, got: list[Any]) -> list[Any]:
        answered = {a["worker"]: a for a in got}
        for worker, last in list(self._last.items()):
            now = answered.get(worker)
            if now is None:  # not answering: its counters stay, its gauges go
                got.append({"samples": _counters_only(last["samples"]), "worker": worker})
            elif now["pid"] != last["pid"]:
                self._retired.append(_counters_only(last["samples"]))
        self._last.update(answered)
        if len(self._retired) > 1:  # keep one sum, however often workers restart
            self._retired = [_counters_only(metrics.merge(self._retired))]
        return got + [{"samples": retired, "worker": -1} for retired in self._retired]


def _counters_only(samples: Samples) -> Samples:
    counting = {f.name for f in FAMILIES if f.kind != "gauge"}
    return {name: value for name, value in samples.items() if name in counting}


def worker_socket(directory: Path, index: int) -> Path:
    return directory / f"worker-{index}.sock"


async def serve_worker_questions(relay: Any, index: int, directory: Path) -> asyncio.Server:
    """Answer the serving worker's questions on this worker's Unix socket."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(WORKER_ANSWER_TIMEOUT):
                question = json.loads(await reader.readline())
                reply = answer(relay, str(question["op"]), str(question.get("arg", "")), index)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except Exception as exc:  # a bad question or a gone asker: this answer only
            log.debug("worker %d: question not answered: %s", index, exc)
        finally:
            writer.close()

    path = worker_socket(directory, index)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # left by this worker's previous life
    return await asyncio.start_unix_server(handle, str(path), limit=MAX_BODY_BYTES)


# -- Prometheus ------------------------------------------------------------------


class _SamplesCollector:
    def __init__(self, samples: Samples) -> None:
        self.samples = samples

    def collect(self) -> Iterator[Metric]:
        for family in FAMILIES:
            value = self.samples.get(family.name)
            if value is None:
                continue
            yield _family(family, value)


def _family(family: metrics.Family, value: Any) -> Metric:
    name = metrics.PREFIX + family.name
    if family.kind == "histogram":
        counts, running = value["counts"], 0.0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip([*family.buckets, float("inf")], counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return HistogramMetricFamily(name, family.help, buckets=buckets, sum_value=value["sum"])
    made: CounterMetricFamily | GaugeMetricFamily
    if family.kind == "counter":
        made = CounterMetricFamily(name, family.help, labels=family.labels or None)
    else:
        made = GaugeMetricFamily(name, family.help, labels=family.labels or None)
    if family.labels:
        for row in value:
            made.add_metric([str(part) for part in row[:-1]], float(row[-1]))
    else:
        made.add_metric([], float(value))
    return made


def render(samples: Samples) -> bytes:
    """``samples`` in the Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SamplesCollector(samples))
    return generate_latest(registry)


def merged_samples(answers: Sequence[Any], count: int) -> Samples:
    """The answers' samples summed; ``workers`` counts the live ones of ``count``."""
    merged = dict(metrics.merge([a["samples"] for a in answers]))
    merged["workers"] = sum(1 for a in answers if "pid" in a and a["worker"] < count)
    return merged


# -- HTTP ------------------------------------------------------------------------


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    head_only: bool = False
    """The answer to HEAD: the head as for GET, no body."""


def _json(status: int, value: object) -> Response:
    return Response(status, json.dumps(value, separators=(",", ":")).encode())


def _error(status: int, message: str, **headers: str) -> Response:
    return Response(
        status,
        json.dumps({"error": message}).encode(),
        headers=tuple(headers.items()),
    )


def _text(status: int, text: str) -> Response:
    return Response(status, text.encode(), "text/plain; charset=utf-8")


Handler = Callable[[Request, str], Awaitable[Response]]


class AdminServer:
    """The listener. Use ``await AdminServer.start(...)`` and ``await server.close()``."""

    def __init__(self, processes: Processes, admin_token: str | None) -> None:
        self.processes = processes
        self._token = admin_token.encode() if admin_token is not None else None
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.StreamWriter, None] = {}  # oldest first
        self._tasks: set[asyncio.Task[None]] = set()
        self.history: deque[dict[str, float]] = deque(maxlen=HISTORY_SAMPLES)
        self._failures = BoundedLog(log)

    @classmethod
    async def start(
        cls,
        processes: Processes,
        admin_token: str | None,
        *,
        listen: tuple[str, int] | None = None,
        sock: socket.socket | None = None,
    ) -> AdminServer:
        """Serve on ``listen`` (host, port; port 0 picks one) or on ``sock``, already bound."""
        server = cls(processes, admin_token)
        if sock is not None:
            server._server = await asyncio.start_server(server._serve, sock=sock)
        else:
            assert listen is not None
            check_listen(listen[0], admin_token)
            server._server = await asyncio.start_server(server._serve, listen[0], listen[1])
        server._spawn(server._keep_history())
        log.info("metrics, admin API and dashboard on %s", server.url)
        return server

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._connections):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- connections --------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while len(self._connections) >= MAX_CONNECTIONS:
            oldest = next(iter(self._connections))
            del self._connections[oldest]
            oldest.close()
        self._connections[writer] = None
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            await self._serve_requests(reader, writer)
        except (ConnectionError, TimeoutError, h11.ProtocolError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:  # a bug in a handler: this connection only
            # A bug, but any peer may trigger it again and again: the lines are bounded.
            self._failures.log(logging.ERROR, "admin listener: a request failed: %r", exc)
        finally:
            self._connections.pop(writer, None)
            writer.close()

    async def _serve_requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        while True:
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    request = await self._read_request(conn, reader)
            except h11.RemoteProtocolError as exc:
                await self._reply(conn, writer, _text(exc.error_status_hint, "bad request\n"))
                return
            if request is None:
                return
            if isinstance(request, Response):  # too big
                await self._reply(conn, writer, request)
                return
            response = await self._route(request)
            response.head_only = request.method == "HEAD"
            await self._reply(conn, writer, response)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> Request | Response | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None
            if isinstance(event, h11.Request):
                head = event
                size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
                if size > MAX_HEAD_BYTES:
                    return _error(431, f"request heads are at most {MAX_HEAD_BYTES} bytes")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY_BYTES:
                    return _error(413, f"request bodies are at most {MAX_BODY_BYTES} bytes")
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                headers = {
                    name.decode("latin-1").lower(): value.decode("latin-1")
                    for name, value in head.headers
                }
                return Request(
                    head.method.decode("ascii", "replace"),
                    head.target.decode("ascii", "replace"),
                    headers,
                    bytes(body),
                )

    async def _reply(
        self, conn: h11.Connection, writer: asyncio.StreamWriter, response: Response
    ) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            *response.headers,
        ]
        if conn.their_state is not h11.DONE:
            headers.append(("connection", "close"))
        writer.write(conn.send(h11.Response(status_code=response.status, headers=headers)) or b"")
        if not response.head_only:
            writer.write(conn.send(h11.Data(data=response.body)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        async with asyncio.timeout(REQUEST_TIMEOUT):
            await writer.drain()

    # -- routes -------------------------------------------------------------

    async def _route(self, request: Request) -> Response:
        path = request.path.split("?", 1)[0]
        method = request.method
        if path.startswith("/api/"):
            refused = self._check_token(request)
            if refused is not None:
                return refused
            return await self._api(method, path, request)
        if method not in ("GET", "HEAD"):
            return _error(405, f"{method} is not allowed on {path}", allow="GET")
        if path == "/metrics":
            samples = merged_samples(await self.processes.ask("samples"), self.processes.count)
            return Response(200, render(samples), PROMETHEUS_TEXT)
        if path == "/healthz":
            return _text(200, "ok\n")
        if path == "/readyz":
            why = observe.not_ready(self.processes.local())
            return _text(200, "ready\n") if why is None else _text(503, f"not ready: {why}\n")
        if path in _STATIC:
            name, content_type = _STATIC[path]
            page = resources.files("burrow.relay").joinpath("static", name).read_bytes()
            return Response(200, page, content_type, _PAGE_HEADERS)
        return _error(404, f"nothing at {path}")

    def _check_token(self, request: Request) -> Response | None:
        if self._token is None:
            if request.method in ("GET", "HEAD"):
                return None
            return _error(
                403,
                "this relay has no admin token: start it with --admin-token-file to end "
                "sessions or revoke tokens through the API",
            )
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self._token):
            return None
        self.processes.local().metrics.admin_unauthorized += 1
        return _error(401, "a valid admin token is needed", **{"www-authenticate": "Bearer"})

    async def _api(self, method: str, path: str, request: Request) -> Response:
        routes: dict[tuple[str, str], Callable[[], Awaitable[Response]]] = {
            ("GET", "/api/status"): self._status,
            ("GET", "/api/sessions"): self._sessions,
            ("GET", "/api/tunnels"): self._tunnels,
            ("GET", "/api/history"): self._history,
            ("POST", "/api/revoke"): lambda: self._revoke(request.body),
        }
        handler = routes.get((method, path))
        if handler is not None:
            return await handler()
        prefix = "/api/sessions/"
        if path.startswith(prefix) and "/" not in path[len(prefix) :]:
            if method != "DELETE":
                return _error(405, f"{method} is not allowed on {path}", allow="DELETE")
            return await self._end_session(path[len(prefix) :])
        if any(path == route for _, route in routes):
            return _error(405, f"{method} is not allowed on {path}")
        return _error(404, f"nothing at {path}")

    async def _status(self) -> Response:
        relay = self.processes.local()
        samples = merged_samples(await self.processes.ask("samples"), self.processes.count)
        refusals = [r for answer in await self.processes.ask("refusals") for r in answer]
        refusals.sort(key=lambda r: r["time"])
        status = observe.relay_status(relay, self.processes.count)
        status["relay"]["auth"] = self._token is not None  # type: ignore[index]
        status["counts"] = counts(samples)
        status["refusals"] = refusals[-metrics.REFUSALS_KEPT :]
        return _json(200, status)

    async def _sessions(self) -> Response:
        listed = [s for answer in await self.processes.ask("sessions") for s in answer]
        listed.sort(key=lambda s: s["connected_since"])
        return _json(200, {"sessions": listed})

    async def _tunnels(self) -> Response:
        listed = [t for answer in await self.processes.ask("tunnels") for t in answer]
        listed.sort(key=lambda t: -t["age_seconds"])
        return _json(200, {"tunnels": listed})

    async def _history(self) -> Response:
        return _json(200, {"interval": HISTORY_INTERVAL, "samples": list(self.history)})

    async def _end_session(self, session_id: str) -> Response:
        if not session_id.isascii() or not session_id.isalnum() or len(session_id) > 64:
            return _error(404, "no session with that id")
        if not any(await self.processes.ask("end-session", session_id)):
            return _error(404, f"no session {session_id}")
        return _json(200, {"ended": session_id})

    async def _revoke(self, body: bytes) -> Response:
        relay = self.processes.local()
        if relay.revoked is None:
            return _error(
                409, "this relay reads no revocation list: start it with --revoked-tokens FILE"
            )
        try:
            token_id = json.loads(body)["token_id"]
            if not isinstance(token_id, str):
                raise TypeError("token_id is not a string")
        except (ValueError, KeyError, TypeError) as exc:
            return _error(400, f'the body must be {{"token_id": "<id>"}} ({exc})')
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            tokens.append_revocation(relay.revoked.path, token_id, f"revoked {stamp} (admin API)")
        except Error as exc:
            return _error(400, str(exc))
        ended = sum(await self.processes.ask("revoked", token_id))
        log.warning("token %s revoked through the admin API: %d sessions ended", token_id, ended)
        return _json(200, {"revoked": token_id, "sessions_ended": ended})

    async def _keep_history(self) -> None:
        while True:
            try:
                answers = await self.processes.ask("samples")
                sample = counts(merged_samples(answers, self.processes.count))
                self.history.append(
                    {
                        "time": time.time(),
                        "sessions": sample["sessions"],
                        "tunnels": sample["tunnels"],
                        "visitors": sample["visitors"],
                        "bytes_to_agent": sample["bytes_to_agent"],
                        "bytes_to_visitor": sample["bytes_to_visitor"],
                    }
                )
            except Exception:  # never let the history end the listener
                log.exception("admin listener: taking a history sample")
            await asyncio.sleep(HISTORY_INTERVAL)


def counts(samples: Samples) -> dict[str, Any]:
    """The headline counts of ``/api/status`` from the merged samples."""

    def one(name: str) -> int:
        value = samples.get(name, 0)
        return int(value) if isinstance(value, (int, float)) else 0

    def by(name: str) -> dict[str, int]:
        rows = samples.get(name, [])
        assert isinstance(rows, list)
        return {str(row[0]): int(row[-1]) for row in rows}

    tunnels = by("tunnels")
    carried = by("bytes_total")
    return {
        "sessions": one("sessions"),
        "tunnels": sum(tunnels.values()),
        "tunnels_by_kind": tunnels,
        "visitors": one("visitors_connected"),
        "handshakes_pending": one("handshakes_pending"),
        "pooled_data_connections": one("pooled_data_connections"),
        "bytes_to_agent": carried.get("to-agent", 0),
        "bytes_to_visitor": carried.get("to-visitor", 0),
        "revoked_tokens": one("revoked_tokens"),
    }
