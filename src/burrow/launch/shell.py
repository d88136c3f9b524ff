"""``burrow launch shell``: a terminal in the browser, behind a tunnel and a token.

A tornado server on a loopback port serves one page (xterm.js, vendored in
``static/xterm``) and one WebSocket, which terminado bridges to a pty running
the user's shell or ``--command``. Each WebSocket, so each browser tab, gets a
shell of its own; closing the tab hangs that shell up (SIGHUP), and a shell
that ends closes its tab's WebSocket with the exit status as the reason.

Who may in: the printed URL carries the token. The page trades it for a
cookie (``__Host-`` prefixed, HttpOnly, Secure, SameSite=Lax) and redirects
to the bare URL, so the token leaves the address bar and the history. Every
other request needs the cookie: without it the answer is 401, with a wrong
token 403. The WebSocket also needs the page's own origin, so no other site
can open a shell with the visitor's cookie.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import pwd
import shlex
import shutil
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import tornado.httpserver
import tornado.netutil
import tornado.web
from terminado.management import MaxTerminalsReached, PtyWithClients, UniqueTermManager
from terminado.websocket import TermSocket

from burrow.agent.client import Client, forward
from burrow.exception import InvalidError
from burrow.launch import DEFAULT_MAX_SHELLS, STOP_SIGNALS, new_token

log = logging.getLogger("burrow.launch.shell")

STATIC_DIR: Final = Path(__file__).parent / "static"

COOKIE: Final = "__Host-burrow-shell"
"""The session cookie. ``__Host-`` makes browsers refuse it unless it is Secure, has
Path=/ and no Domain: another tunnel under the same relay domain cannot set or
shadow it."""

MAX_MESSAGE_BYTES: Final = 1 << 20
"""Largest WebSocket message taken (1 MiB: a big paste); tornado closes with 1009 past it."""

MAX_TERMINAL_SIDE: Final = 10_000
"""Rows or columns a resize may ask for; more is a bug or an attack on the pty."""

CLOSE_TIMEOUT: Final = 3.0
"""Seconds a stopping launcher waits for its tabs to answer the close frame."""

HANGUP_GRACE: Final = 2.0
"""Seconds a hung-up shell gets to end before terminado escalates to SIGTERM and SIGKILL."""

PING_INTERVAL: Final = 30.0
"""Seconds between WebSocket pings: keeps idle tabs' connections up and finds dead ones."""

PING_TIMEOUT: Final = 90.0
"""Seconds without a pong after which a tab is taken for gone and its shell hung up."""

# WebSocket close codes (RFC 6455 section 7.4.1).
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_UNSUPPORTED: Final = 1003
CLOSE_INVALID: Final = 1007
CLOSE_INTERNAL: Final = 1011
CLOSE_TRY_AGAIN: Final = 1013

SECURITY_HEADERS: Final = {
    # The page loads only its own files and talks only to its own WebSocket;
    # xterm.js sets styles from script, hence 'unsafe-inline' for styles.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; font-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class ShellOptions:
    """What ``burrow launch shell`` was asked for."""

    command: Sequence[str] | None = None
    """The program each tab runs, with its arguments; ``None``: the user's login shell."""

    cwd: Path | None = None
    """Directory the shells start in; ``None``: the current one."""

    allow: Sequence[str] | None = None
    """CIDRs visitors may come from (``inbound_cidr_allowlist``); ``None``: everyone."""

    max_shells: int = DEFAULT_MAX_SHELLS
    """Shells open at once; one more tab gets a close with code 1013."""

    client: Client | None = None
    """Relay settings; ``None`` takes them from the environment or a running ``burrow dev``."""


def default_shell() -> list[str]:
    """``$SHELL``, else the login shell in the password database, else ``/bin/sh``."""
    shell = os.environ.get("SHELL")
    if not shell:
        try:
            shell = pwd.getpwuid(os.getuid()).pw_shell
        except KeyError:
            shell = None
    return [shell or "/bin/sh"]


def shell_argv(command: str | None) -> list[str]:
    """The argv for ``--command`` (split like a shell would), or the default shell."""
    if command is None:
        return default_shell()
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise InvalidError(f"--command {command!r}: {exc}") from None
    if not argv:
        raise InvalidError("--command is empty")
    return argv


class ShellManager(UniqueTermManager):
    """terminado's one-shell-per-WebSocket manager, with a firmer hang-up.

    A tab that goes away hangs its shell up (SIGHUP to its process group), and
    from then on the shell no longer counts against ``max_terminals``: a reload
    with ``--max-shells 1`` must not be refused while the old shell winds down.
    A shell that ignores the hang-up is ended after ``HANGUP_GRACE`` seconds.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hung_up: weakref.WeakSet[PtyWithClients] = weakref.WeakSet()
        self._reapers: set[asyncio.Task[None]] = set()

    def get_terminal(self, url_component: Any = None) -> PtyWithClients:
        live = sum(1 for term in self.ptys_by_fd.values() if term not in self.hung_up)
        if self.max_terminals and live >= self.max_terminals:
            raise MaxTerminalsReached(self.max_terminals)
        term = self.new_terminal()
        self.start_reading(term)
        return term

    def client_disconnected(self, websocket: TermSocket) -> None:
        terminal = websocket.terminal
        if terminal is None:
            return  # the shell has ended already
        self.hung_up.add(terminal)
        with contextlib.suppress(ProcessLookupError):
            super().client_disconnected(websocket)
        task = asyncio.get_running_loop().create_task(self._reap(terminal))
        self._reapers.add(task)
        task.add_done_callback(self._reapers.discard)

    async def _reap(self, terminal: PtyWithClients) -> None:
        await asyncio.sleep(HANGUP_GRACE)
        if terminal.ptyproc.isalive():
            log.info("a hung-up shell is still running: ending it")
            await terminal.terminate(force=True)


def _same(supplied: str, expected: str) -> bool:
    return hmac.compare_digest(supplied.encode(), expected.encode())


def _has_session(handler: tornado.web.RequestHandler, token: str) -> bool:
    """Whether the request carries the session cookie."""
    cookie = handler.get_cookie(COOKIE)
    return cookie is not None and _same(cookie, token)


def _close_reason(text: str) -> str:
    """``text`` cut to the 123 bytes a WebSocket close reason may hold (RFC 6455 5.5)."""
    return text.encode()[:123].decode(errors="ignore")


class _Guarded(tornado.web.RequestHandler):
    """A handler that lets in only requests with the session cookie (401 otherwise)."""

    token: str

    def initialize(self, token: str) -> None:
        self.token = token

    def set_default_headers(self) -> None:
        for name, value in SECURITY_HEADERS.items():
            self.set_header(name, value)

    def prepare(self) -> None:
        if not _has_session(self, self.token):
            raise tornado.web.HTTPError(401)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        if status_code == 401:
            self.finish("401: open the URL that `burrow launch shell` printed, with its token\n")
        elif status_code == 403:
            self.finish("403: wrong token\n")
        else:
            self.finish(f"{status_code}: {self._reason}\n")


class PageHandler(_Guarded):
    """``/``: trades ``?token=`` for the cookie, then serves the terminal page."""

    def prepare(self) -> None:
        pass  # get() decides: a token in the query, or the cookie

    def get(self) -> None:
        supplied = self.get_query_argument("token", None)
        if supplied is not None:
            if not _same(supplied, self.token):
                raise tornado.web.HTTPError(403)
            self.set_cookie(
                COOKIE, self.token, path="/", secure=True, httponly=True, samesite="Lax"
            )
            self.redirect("/", status=303)  # the bare URL: the token leaves the address bar
            return
        if not _has_session(self, self.token):
            raise tornado.web.HTTPError(401)
        self.set_header("Cache-Control", "no-store")
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish((STATIC_DIR / "shell.html").read_bytes())


class AssetHandler(tornado.web.StaticFileHandler):
    """``/static/...``: xterm.js and the page's script and style, for cookie holders only."""

    token: str

    def initialize(self, path: str, token: str) -> None:  # type: ignore[override]
        super().initialize(path)
        self.token = token

    def set_default_headers(self) -> None:
        for name, value in SECURITY_HEADERS.items():
            self.set_header(name, value)

    def prepare(self) -> None:
        if not _has_session(self, self.token):
            raise tornado.web.HTTPError(401)


class NotFoundHandler(_Guarded):
    """Any other path: 401 without the cookie (nothing to learn there), 404 with it."""

    def get(self) -> None:
        raise tornado.web.HTTPError(404)


class ShellSocket(TermSocket):
    """``/ws``: one shell per connection, in terminado's JSON message format.

    From the page: ``["stdin", text]`` and ``["set_size", rows, cols]``. To it:
    ``["setup", {}]``, ``["stdout", text]`` and ``["disconnect", 1]``. Anything
    else closes the connection with a code and a reason that says what was wrong.
    """

    token: str

    def initialize(  # type: ignore[override]
        self, term_manager: ShellManager, token: str, sockets: set[ShellSocket]
    ) -> None:
        super().initialize(term_manager)
        self.token = token
        self.sockets = sockets
        self.ended = asyncio.Event()

    def prepare(self) -> None:
        # Runs before the upgrade: a refusal here is a plain HTTP 401. The
        # Origin check (tornado's check_origin: same host as the page) follows.
        if not _has_session(self, self.token):
            raise tornado.web.HTTPError(401)

    def open(self, url_component: Any = None) -> None:
        self.sockets.add(self)
        try:
            super().open(url_component)
        except MaxTerminalsReached as exc:
            self.close(CLOSE_TRY_AGAIN, _close_reason(f"{exc}: close another tab first"))
        except OSError as exc:
            self.close(CLOSE_INTERNAL, _close_reason(f"cannot start the shell: {exc}"))

    def on_message(self, message: str | bytes) -> Awaitable[None] | None:  # type: ignore[override]
        if isinstance(message, bytes):
            self._refuse(CLOSE_UNSUPPORTED, "binary messages are not accepted")
            return None
        try:
            command = json.loads(message)
        except ValueError:
            self._refuse(CLOSE_INVALID, "messages must be JSON")
            return None
        terminal = self.terminal
        if terminal is None:
            return None  # the shell has ended; the close is on its way
        match command:
            case ["stdin", str() as text] if _utf8(text):
                result: Awaitable[None] = self.stdin_to_ptyproc(text)
                return result
            case ["set_size", int() as rows, int() as cols] if _side(rows) and _side(cols):
                self.size = (rows, cols)  # type: ignore[assignment]
                terminal.resize_to_smallest()
                return None
        self._refuse(CLOSE_INVALID, 'expected ["stdin", text] or ["set_size", rows, cols]')
        return None

    def on_close(self) -> None:
        super().on_close()
        self.sockets.discard(self)
        self.ended.set()

    def _refuse(self, code: int, reason: str) -> None:
        log.info("closing a shell WebSocket: %s", reason)
        self.close(code, _close_reason(reason))

    def on_pty_died(self) -> None:
        how = ""
        if self.terminal is not None:
            process = self.terminal.ptyproc
            if process.signalstatus:
                how = f" (signal {process.signalstatus})"
            elif process.exitstatus:
                how = f" (exit {process.exitstatus})"
        self.send_json_message(["disconnect", 1])
        self.close(CLOSE_NORMAL, f"the shell ended{how}")
        self.terminal = None


def _utf8(text: str) -> bool:
    """Whether ``text`` can go to the pty (JSON can carry lone surrogates; UTF-8 cannot)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _side(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return 1 <= value <= MAX_TERMINAL_SIDE


def _log_request(handler: tornado.web.RequestHandler) -> None:
    # Tornado's own access log would write the token in the query string.
    request = handler.request
    log.debug("%d %s %s", handler.get_status(), request.method, request.path)


def make_app(
    token: str, manager: ShellManager, sockets: set[ShellSocket]
) -> tornado.web.Application:
    """The tornado application: the page, its files, the WebSocket; 401 for the rest.

    ``sockets`` holds the open WebSockets, for a clean stop.
    """
    return tornado.web.Application(
        [
            (r"/", PageHandler, {"token": token}),
            (r"/static/(.*)", AssetHandler, {"path": str(STATIC_DIR), "token": token}),
            (r"/ws", ShellSocket, {"term_manager": manager, "token": token, "sockets": sockets}),
        ],
        default_handler_class=NotFoundHandler,
        default_handler_args={"token": token},
        websocket_max_message_size=MAX_MESSAGE_BYTES,
        websocket_ping_interval=PING_INTERVAL,
        websocket_ping_timeout=PING_TIMEOUT,
        log_function=_log_request,
    )


async def serve(
    options: ShellOptions, argv: list[str], echo: Callable[[str], None], stop: asyncio.Event
) -> None:
    """Serve shells behind a tunnel until ``stop`` is set; ``echo`` gets the URL."""
    token = new_token()
    term_settings: dict[str, Any] = {}
    if options.cwd is not None:
        term_settings["cwd"] = str(options.cwd)
    manager = ShellManager(
        shell_command=argv, max_terminals=options.max_shells, term_settings=term_settings
    )
    open_sockets: set[ShellSocket] = set()
    listeners = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server = tornado.httpserver.HTTPServer(make_app(token, manager, open_sockets))
    server.add_sockets(listeners)
    port: int = listeners[0].getsockname()[1]
    try:
        async with forward(
            port, inbound_cidr_allowlist=options.allow, client=options.client
        ) as tunnel:
            echo(f"{tunnel.url}/?token={token}")
            try:
                await stop.wait()
            finally:
                # Inside the tunnel's block, so the tabs still get the close frame.
                await _hang_up(server, manager, open_sockets)
    finally:
        server.stop()
        await manager.shutdown()


async def _hang_up(
    server: tornado.httpserver.HTTPServer, manager: ShellManager, sockets: set[ShellSocket]
) -> None:
    """Stop taking visitors, tell every open tab why, and end the shells."""
    server.stop()
    waiting = [socket.ended.wait() for socket in sockets]
    for socket in list(sockets):
        socket.close(CLOSE_GOING_AWAY, "burrow launch shell is stopping")
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await asyncio.gather(*waiting)
    await manager.shutdown()


def run_shell(options: ShellOptions, echo: Callable[[str], None]) -> int:
    """Run the browser shell until SIGINT, SIGTERM or SIGHUP; the command's exit code (0)."""
    argv = list(options.command) if options.command else default_shell()
    if shutil.which(argv[0]) is None:
        raise InvalidError(f"cannot run {argv[0]!r}: not found or not executable")
    if options.cwd is not None and not options.cwd.is_dir():
        raise InvalidError(f"--cwd {options.cwd} is not a directory")
    (options.client or Client()).config()  # no relay: say so before serving anything

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, stop.set)
        await serve(options, argv, echo, stop)

    asyncio.run(main())
    return 0
