"""``burrow.Sandbox``: run a command apart from the machine, with its ports published.

The command runs under bubblewrap when it works here (read-only root,
private /tmp, its own user, pid, ipc and uts namespaces), else in namespaces
from ``unshare``, else as a plain process group. This process's agent
forwards the declared ports under the sandbox's workload id until the
command ends or its timeout passes; then every process of the sandbox is
killed and the tunnels are closed.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import enum
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Concatenate, Final, ParamSpec, TypeVar

from burrow._aio import dual_method
from burrow.agent.client import Client, forward, runtime, workload_env
from burrow.agent.session import AgentConfig
from burrow.exception import (
    Error,
    InvalidError,
    SandboxTerminatedError,
    SandboxTimeoutError,
)
from burrow.net import ready
from burrow.tunnel import Tunnel
from burrow.wire import allowlist

log = logging.getLogger("burrow.sandbox")

P = ParamSpec("P")
T = TypeVar("T")
S = TypeVar("S")

# Modal's exit codes for a sandbox that did not end by itself, as `timeout(1)`
# and a SIGKILL would give them.
EXIT_TIMEOUT: Final = 124
EXIT_TERMINATED: Final = 137
# The command never ran (its ports could not be published): as `env` and
# `docker run` say that they themselves failed.
EXIT_NOT_STARTED: Final = 125

# After the command ends, how long its output may take to drain from the
# pipes: a process that escaped the sandbox's group could hold them open.
PUMP_DRAIN_TIMEOUT: Final = 5.0

# How long ending one sandbox may hold up the interpreter's exit.
AT_EXIT_TIMEOUT: Final = 10.0

# Modal's default lifetime of a sandbox, and its upper bound (24 hours).
DEFAULT_TIMEOUT: Final = 300
MAX_TIMEOUT: Final = 24 * 3600

# Output kept per stream for read(): a sandbox nobody reads must neither
# block on a full pipe nor grow without bound, so the oldest bytes go first.
MAX_BUFFERED_OUTPUT: Final = 16 * 1024 * 1024
READ_CHUNK: Final = 64 * 1024

# How long the trial run of an isolation tool may take before it counts as broken.
PROBE_TIMEOUT: Final = 10.0

# The only variables a sandbox inherits from this process: a sandbox should
# not see the secrets of the program that starts it.
PASSED_ENV: Final = ("PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TERM", "TZ")

# The uid and gid a sandbox runs as when bubblewrap is started by root: an
# unprivileged id inside a user namespace holds no capabilities.
SANDBOX_ID_FOR_ROOT: Final = 65534

# Directories replaced by an empty tmpfs under bubblewrap: scratch space the
# sandbox gets its own of, and places where a host keeps sockets and secrets.
PRIVATE_DIRS: Final = ("/tmp", "/var/tmp", "/run", "/dev/shm")
HOME_DIRS: Final = ("/root", "/home")


class IsolationLevel(enum.StrEnum):
    """How far a sandbox is kept apart from the machine, best first."""

    BWRAP = "bwrap"
    """bubblewrap: read-only root, private /tmp and /run, home directories
    hidden, its own user (no capabilities), pid, ipc, uts and mount namespaces."""

    UNSHARE = "unshare"
    """``unshare``: its own pid, ipc, uts and mount namespaces; the file
    system is the machine's, writable as this user."""

    NONE = "none"
    """A plain process group: no isolation, only lifetime control."""


@dataclass(frozen=True)
class Isolation:
    """What is in effect for one sandbox (``sb.isolation``)."""

    level: IsolationLevel
    namespaces: tuple[str, ...] = ()
    """The Linux namespaces the sandbox has of its own."""

    read_only_root: bool = False
    private_dirs: tuple[str, ...] = ()
    """Directories the sandbox sees as empty and private (its own tmpfs)."""

    network: str = "shared"
    """Always ``shared``: the sandbox uses the machine's network, so that the
    agent reaches its ports on 127.0.0.1 and ``forward()`` inside it reaches the relay."""

    def __str__(self) -> str:
        parts = [f"namespaces: {', '.join(self.namespaces) or 'none'}"]
        if self.read_only_root:
            parts.append("read-only root")
        if self.private_dirs:
            parts.append(f"private {', '.join(self.private_dirs)}")
        parts.append(f"network {self.network}")
        return f"{self.level.value} ({'; '.join(parts)})"


# -- isolation ----------------------------------------------------------------


def _bwrap_args(hidden: Sequence[str], sandbox_id: str) -> list[str]:
    """bubblewrap's options, without the binds of one sandbox's workdir and CA."""
    args = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for path in hidden:
        if os.path.isdir(path):
            args += ["--tmpfs", path]
    # A resolv.conf that points into /run (systemd-resolved) must survive /run going private.
    resolv = os.path.realpath("/etc/resolv.conf")
    if resolv.startswith("/run/") and os.path.exists(resolv):
        args += ["--ro-bind", resolv, resolv]
    args += ["--unshare-user"]
    if os.getuid() == 0:
        args += ["--uid", str(SANDBOX_ID_FOR_ROOT), "--gid", str(SANDBOX_ID_FOR_ROOT)]
    args += [
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--hostname",
        sandbox_id,
        "--die-with-parent",
        "--new-session",
    ]
    return args


def _unshare_args() -> list[str]:
    args = ["unshare", "--fork", "--pid", "--mount-proc", "--ipc", "--uts", "--kill-child"]
    if os.getuid() != 0:
        args += ["--user", "--map-root-user"]
    return args


def _lifetime_args() -> list[str]:
    """For the levels without --die-with-parent: no setuid gains, death with this process.

    The parent-death signal follows the thread that started the process:
    sandboxes are started from the agent's thread, which lives as long as the
    process does.
    """
    if shutil.which("setpriv") is None:
        return []
    return ["setpriv", "--no-new-privs", "--pdeathsig", "KILL", "--"]


_ISOLATION_NAMESPACES: Final = {
    IsolationLevel.BWRAP: ("user", "pid", "ipc", "uts", "mount", "cgroup"),
    IsolationLevel.UNSHARE: ("pid", "ipc", "uts", "mount"),
    IsolationLevel.NONE: (),
}

_works: dict[IsolationLevel, str | None] = {}


def _try(level: IsolationLevel) -> str | None:
    """``None`` if ``level`` works on this machine, else why not (a trial run, cached)."""
    if level in _works:
        return _works[level]
    true = shutil.which("true") or "/bin/true"
    if level is IsolationLevel.BWRAP:
        if shutil.which("bwrap") is None:
            why: str | None = "bwrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
        else:
            why = _trial([*_bwrap_args([*PRIVATE_DIRS, *HOME_DIRS], "probe"), "--", true])
    elif level is IsolationLevel.UNSHARE:
        if shutil.which("unshare") is None:
            why = "unshare is not installed (util-linux)"
        else:
            why = _trial([*_unshare_args(), *_lifetime_args(), true])
    else:
        why = None
    _works[level] = why
    return why


def _trial(argv: list[str]) -> str | None:
    try:
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=PROBE_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{argv[0]} failed: {exc}"
    if result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip().splitlines()
        return f"{argv[0]} failed here: {message[-1] if message else f'exit {result.returncode}'}"
    return None


def available_isolation() -> IsolationLevel:
    """The best isolation level that works on this machine (tried once per process)."""
    for level in IsolationLevel:
        if _try(level) is None:
            return level
    raise AssertionError("a plain process always works")


def _choose(requested: str) -> IsolationLevel:
    if requested == "auto":
        return available_isolation()
    try:
        level = IsolationLevel(requested)
    except ValueError:
        choices = ", ".join(["auto", *IsolationLevel])
        raise InvalidError(f"isolation must be one of {choices}, not {requested!r}") from None
    why = _try(level)
    if why is not None:
        raise InvalidError(f"isolation {level.value!r} does not work on this machine: {why}")
    return level


def _python_prefixes() -> set[str]:
    return {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}


def _burrow_root() -> str:
    """The directory burrow is imported from (site-packages, or a source tree's src/)."""
    import burrow

    return os.path.dirname(os.path.dirname(os.path.realpath(burrow.__file__)))


def _under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _on_agent_loop(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on the agent loop and wait for it (from a plain thread)."""
    return runtime.run(coro)


def _on_agent_loop_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on the agent loop; the caller's loop awaits the result."""
    return asyncio.wrap_future(runtime.submit(coro))


# -- output -------------------------------------------------------------------


class SandboxStream:
    """The stdout or stderr of a sandbox.

    ``read()`` waits for the end and returns all text not read yet;
    ``for line in sb.stdout`` gives lines as they come (``async for`` too).
    ``await sb.stdout.read.aio()`` is the async ``read()``.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._buffer = bytearray()
        self._eof = False
        self._changed: asyncio.Event | None = None  # made on the agent loop
        self.dropped = 0
        """Bytes dropped unread because more than ``MAX_BUFFERED_OUTPUT`` was waiting."""

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _feed(self, data: bytes) -> None:
        self._buffer += data
        excess = len(self._buffer) - MAX_BUFFERED_OUTPUT
        if excess > 0:
            del self._buffer[:excess]
            self.dropped += excess
        self._event().set()

    def _close(self) -> None:
        self._eof = True
        self._event().set()

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        try:
            while chunk := await reader.read(READ_CHUNK):
                self._feed(chunk)
        except OSError as exc:  # pragma: no cover - a pipe does not fail on Linux
            log.debug("%s: %s", self.name, exc)
        finally:
            self._close()

    async def _read(self) -> str:
        while not self._eof:
            event = self._event()
            event.clear()
            await event.wait()
        data = bytes(self._buffer)
        self._buffer.clear()
        return data.decode(errors="replace")

    read = dual_method(_read, _on_agent_loop, _on_agent_loop_async)

    async def _readline(self) -> str | None:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0 or (self._eof and self._buffer):
                end = end + 1 if end >= 0 else len(self._buffer)
                line = bytes(self._buffer[:end])
                del self._buffer[:end]
                return line.decode(errors="replace")
            if self._eof:
                return None
            event = self._event()
            event.clear()
            await event.wait()

    def __iter__(self) -> Iterator[str]:
        while (line := _on_agent_loop(self._readline())) is not None:
            yield line

    async def __aiter__(self) -> AsyncIterator[str]:
        while (line := await _on_agent_loop_async(self._readline())) is not None:
            yield line


def _agent_loop_method(
    fn: Callable[Concatenate[S, P], Coroutine[Any, Any, T]],
) -> dual_method[S, P, T]:
    """A coroutine method that runs on the agent loop: ``m()`` blocks, ``await m.aio()`` not."""
    return dual_method(fn, _on_agent_loop, _on_agent_loop_async)


# -- the sandbox --------------------------------------------------------------


@dataclass(frozen=True)
class _Port:
    port: int
    unencrypted: bool
    h2: bool


def _check_ports(
    encrypted: Sequence[int], unencrypted: Sequence[int], h2: Sequence[int]
) -> list[_Port]:
    ports: list[_Port] = []
    seen: set[int] = set()
    for name, values, tcp, is_h2 in (
        ("encrypted_ports", encrypted, False, False),
        ("unencrypted_ports", unencrypted, True, False),
        ("h2_ports", h2, False, True),
    ):
        if isinstance(values, str | bytes | int) or not isinstance(values, Sequence | set):
            raise InvalidError(f"{name} should be a list of port numbers, not {values!r}")
        for port in values:
            if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
                raise InvalidError(f"{name}: {port!r} is not a port number (1-65535)")
            if port in seen:
                raise InvalidError(f"Port {port} is declared more than once")
            seen.add(port)
            ports.append(_Port(port, tcp, is_h2))
    return ports


async def _create_sandbox(
    cls: type[Sandbox],
    *cmd: str,
    encrypted_ports: Sequence[int] = (),
    unencrypted_ports: Sequence[int] = (),
    h2_ports: Sequence[int] = (),
    inbound_cidr_allowlist: Sequence[str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 - Modal's name: the sandbox's lifetime
    workdir: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    client: Client | None = None,
    isolation: str = "auto",
    capture_output: bool = True,
) -> Sandbox:
    self: Sandbox = object.__new__(cls)
    await self._start(
        cmd,
        ports=_check_ports(encrypted_ports, unencrypted_ports, h2_ports),
        inbound_cidr_allowlist=inbound_cidr_allowlist,
        timeout=timeout,
        workdir=workdir,
        env=env,
        client=client,
        isolation=isolation,
        capture_output=capture_output,
    )
    return self


_live: weakref.WeakSet[Sandbox] = weakref.WeakSet()


@atexit.register
def _terminate_live_sandboxes() -> None:
    """At exit, end the sandboxes still running, so their tunnels close and workdirs go.

    (They would die with the process anyway; this also cleans up after them.)
    """
    for sb in list(_live):
        if sb.poll() is None:
            with contextlib.suppress(Exception):
                runtime.submit(sb._terminate()).result(timeout=AT_EXIT_TIMEOUT)


class Sandbox:
    """A command running apart from the machine, its declared ports published.

    Make one with :meth:`create`. The process lives until it ends by itself,
    :meth:`terminate` is called, or ``timeout`` seconds pass; then all of its
    processes are killed and its tunnels closed. As a context manager it is
    terminated when the block ends (``with`` and ``async with``).
    """

    object_id: str
    """The sandbox's id (``sb-...``); also its workload id (``BURROW_WORKLOAD``)."""

    isolation: Isolation
    """What keeps the sandbox apart from the machine; see ``docs/use-cases/sandboxes.md``."""

    workdir: Path
    """The sandbox's working directory: writable, and ``HOME`` inside it."""

    stdout: SandboxStream
    stderr: SandboxStream

    def __init__(self) -> None:
        raise InvalidError("Make a sandbox with burrow.Sandbox.create(...)")

    # -- creation -------------------------------------------------------------

    create = dual_method(_create_sandbox, _on_agent_loop, _on_agent_loop_async, on_class=True)
    """Start ``cmd`` in a sandbox and publish its ports; returns the :class:`Sandbox`.

    ``Sandbox.create("python", "-m", "http.server", "8000", encrypted_ports=[8000])``

    - ``encrypted_ports``: published at an ``https://`` URL (the relay ends TLS).
    - ``unencrypted_ports``: the same, plus a raw TCP socket (``tunnel.tcp_socket``).
    - ``h2_ports``: HTTPS with HTTP/2 offered (the server must speak h2c).
    - ``inbound_cidr_allowlist``: only these networks may visit, on every port.
    - ``timeout``: seconds the sandbox may live (default 300, at most 24 h).
    - ``workdir``: its working directory, writable (default: a fresh temporary
      directory, removed when the sandbox ends).
    - ``env``: variables for it; of this process's own it gets only ``PATH``
      and the locale. ``HOME`` is the workdir.
    - ``client``: relay settings (default: the environment, or ``burrow dev``).
    - ``isolation``: ``"auto"`` (the best that works here), or one of
      ``"bwrap"``, ``"unshare"``, ``"none"`` to require it.
    - ``capture_output``: ``False`` lets the sandbox write to this process's
      stdout and stderr (and read its stdin) instead of ``sb.stdout``/``sb.stderr``.

    ``await burrow.Sandbox.create.aio(...)`` is the async form. Raises
    ``InvalidError`` for a bad argument, a command that cannot be found, or
    missing relay settings.
    """

    async def _start(
        self,
        cmd: Sequence[str],
        *,
        ports: list[_Port],
        inbound_cidr_allowlist: Sequence[str] | None,
        timeout: float,  # noqa: ASYNC109 - the sandbox's lifetime, not this call's
        workdir: str | os.PathLike[str] | None,
        env: Mapping[str, str] | None,
        client: Client | None,
        isolation: str,
        capture_output: bool,
    ) -> None:
        if not cmd:
            raise InvalidError(
                "Sandbox.create needs a command to run, e.g. create('python', 'app.py')"
            )
        if not all(isinstance(arg, str) for arg in cmd):
            raise InvalidError(f"The command's arguments must be strings, not {list(cmd)!r}")
        if (
            not isinstance(timeout, int | float)
            or isinstance(timeout, bool)
            or not 0 < timeout <= MAX_TIMEOUT
        ):
            raise InvalidError(f"timeout must be seconds in (0, {MAX_TIMEOUT}], not {timeout!r}")
        if env is not None and not all(
            isinstance(k, str) and isinstance(v, str) and k and "=" not in k for k, v in env.items()
        ):
            raise InvalidError("env must map variable names to string values")
        if inbound_cidr_allowlist is not None:
            try:
                allowlist.parse(inbound_cidr_allowlist)
            except InvalidError as exc:
                raise InvalidError(f"inbound_cidr_allowlist: {exc}") from None
        level = await asyncio.to_thread(_choose, isolation)

        self.object_id = "sb-" + secrets.token_urlsafe(12)
        self._timeout = float(timeout)
        self._ports = ports
        self._allow = inbound_cidr_allowlist
        base = (client or Client()).config()
        self._settings: AgentConfig = replace(base, workload=self.object_id)
        self._tunnels: dict[int, Tunnel] = {}
        self._forwards: list[forward] = []
        self._error: BaseException | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._published = asyncio.Event()
        self._finished = asyncio.Event()
        self._ended_by: str | None = None  # "timeout" or "terminate"
        self._returncode: int | None = None
        self.stdout = SandboxStream("stdout")
        self.stderr = SandboxStream("stderr")

        self._own_workdir = workdir is None
        try:
            argv, child_env = await asyncio.to_thread(self._prepare, cmd, level, workdir, env)
        except BaseException:
            self._remove_workdir()
            raise
        self._runner = asyncio.create_task(self._run(argv, child_env, capture_output))
        _live.add(self)

    def _prepare(
        self,
        cmd: Sequence[str],
        level: IsolationLevel,
        workdir_arg: str | os.PathLike[str] | None,
        env: Mapping[str, str] | None,
    ) -> tuple[list[str], dict[str, str]]:
        """Make the workdir; the argv that starts ``cmd`` at ``level``, and its environment."""
        if workdir_arg is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"burrow-{self.object_id}-"))
        else:
            self.workdir = Path(os.path.realpath(workdir_arg))
            if not os.path.isdir(self.workdir):
                raise InvalidError(f"workdir {str(workdir_arg)!r} is not a directory")
        workdir = str(self.workdir)
        base = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
        base["HOME"] = workdir
        base.update(env or {})
        child_env = workload_env(self._settings, base)

        program = cmd[0]
        if "/" in program:
            path = os.path.join(workdir, program)
            found = path if os.access(path, os.X_OK) and os.path.isfile(path) else None
        else:
            found = shutil.which(program, path=child_env.get("PATH", os.defpath))
        if found is None:
            raise InvalidError(f"Cannot run {program!r}: no such executable file")
        found = os.path.abspath(found)

        if level is IsolationLevel.BWRAP:
            hidden = [*PRIVATE_DIRS, *HOME_DIRS]
            # Home directories and /tmp are hidden, but the Python running burrow
            # (pyenv, or a virtualenv under /tmp, say), burrow itself (an editable
            # install's source tree) and the prefix of the command's bin/
            # directory are shown again, read-only, if they live there.
            shown = sorted(
                {
                    path
                    for path in (
                        *(os.path.realpath(p) for p in _python_prefixes()),
                        _burrow_root(),
                        os.path.dirname(os.path.dirname(os.path.realpath(found))),
                    )
                    if any(_under(path, home) and path != home for home in hidden)
                }
            )
            visible = [workdir, *shown]
            for directory in hidden:
                real = os.path.realpath(found)
                if _under(real, directory) and not any(_under(real, v) for v in visible):
                    raise InvalidError(
                        f"Cannot run {found!r} in the sandbox: {directory} is private there; "
                        "put it in the workdir or elsewhere"
                    )
            argv = _bwrap_args(hidden, self.object_id)
            for path in shown:
                argv += ["--ro-bind", path, path]
            argv += ["--bind", workdir, workdir]
            if self._settings.ca is not None:
                ca = str(self._settings.ca.resolve())
                argv += ["--ro-bind", ca, ca]
                child_env["BURROW_CA"] = ca
            argv += ["--chdir", workdir, "--", found, *cmd[1:]]
            self.isolation = Isolation(
                level,
                _ISOLATION_NAMESPACES[level],
                read_only_root=True,
                private_dirs=tuple(d for d in hidden if os.path.isdir(d)),
            )
        elif level is IsolationLevel.UNSHARE:
            argv = [*_unshare_args(), *_lifetime_args(), found, *cmd[1:]]
            self.isolation = Isolation(level, _ISOLATION_NAMESPACES[level])
        else:
            argv = [*_lifetime_args(), found, *cmd[1:]]
            self.isolation = Isolation(level)
        return argv, child_env

    # -- life -----------------------------------------------------------------

    async def _run(self, argv: list[str], env: dict[str, str], capture_output: bool) -> None:
        """The sandbox's life: publish its ports, run the command, clean up after it.

        The command starts only once its ports are published, so that they
        are the sandbox's before any of its code can try to forward them.
        """
        code: int | None = None
        pumps: list[asyncio.Task[None]] = []
        try:
            async with asyncio.timeout(self._timeout) as lifetime:
                await self._publish()
                self._proc = await asyncio.create_subprocess_exec(
                    *argv,
                    env=env,
                    cwd=self.workdir,
                    stdin=subprocess.DEVNULL if capture_output else None,
                    stdout=subprocess.PIPE if capture_output else None,
                    stderr=subprocess.PIPE if capture_output else None,
                    start_new_session=True,
                )
                log.info("sandbox %s: pid %d, %s", self.object_id, self._proc.pid, self.isolation)
                for stream, reader in (
                    (self.stdout, self._proc.stdout),
                    (self.stderr, self._proc.stderr),
                ):
                    if reader is not None:
                        pumps.append(asyncio.create_task(stream._pump(reader)))
                code = await self._proc.wait()
        except TimeoutError as exc:
            if not lifetime.expired():
                self._error = exc
            elif self._ended_by is None:
                self._ended_by = "timeout"
                log.info("sandbox %s: timeout %gs, killing it", self.object_id, self._timeout)
        except asyncio.CancelledError:
            if self._ended_by != "terminate":
                raise
        except OSError as exc:
            self._error = InvalidError(f"Cannot start the sandbox: {exc}")
        except Exception as exc:
            self._error = exc
            log.warning("sandbox %s: %s", self.object_id, exc)
        finally:
            try:
                if self._proc is not None:
                    # Whatever the command left behind in its process group goes with it.
                    self._kill()
                    code = await self._proc.wait()
                self._published.set()
                await self._close_tunnels()
                for pump in pumps:
                    # Output still in the pipes is read to the end, unless someone
                    # outside the sandbox's process group holds them open.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(pump), PUMP_DRAIN_TIMEOUT)
                    pump.cancel()
                # Not in a worker thread: at interpreter exit no new ones may start.
                self._remove_workdir()
            finally:
                self.stdout._close()
                self.stderr._close()
                if self._ended_by == "timeout":
                    code = EXIT_TIMEOUT
                elif self._ended_by == "terminate":
                    code = EXIT_TERMINATED
                elif code is None:
                    code = EXIT_NOT_STARTED
                self._returncode = code
                self._published.set()
                self._finished.set()
                log.info("sandbox %s: ended, exit code %d", self.object_id, code)

    async def _publish(self) -> None:
        """Forward the declared ports under the sandbox's workload id."""
        client = Client(
            relay=self._settings.relay,
            token=self._settings.token,
            ca=self._settings.ca,
            plain_data=self._settings.plain_data,
            workload=self.object_id,
        )
        self._forwards = [
            forward(
                p.port,
                unencrypted=p.unencrypted,
                h2_enabled=p.h2,
                inbound_cidr_allowlist=self._allow,
                client=client,
            )
            for p in self._ports
        ]
        # All finish before a failure is raised, so that closing finds every tunnel opened.
        results = await asyncio.gather(*(f._open() for f in self._forwards), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        self._tunnels = {
            p.port: t for p, t in zip(self._ports, results, strict=True) if isinstance(t, Tunnel)
        }
        self._published.set()

    def _kill(self) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self._proc.kill()

    async def _close_tunnels(self) -> None:
        self._tunnels = {}
        for fw in self._forwards:
            try:
                await fw._close()
            except Error as exc:  # the relay may be gone; the tunnel goes with the session
                log.debug("sandbox %s: closing port %d: %s", self.object_id, fw.port, exc)
        if self._ports:
            await runtime.close_session(self._settings)

    def _remove_workdir(self) -> None:
        if self._own_workdir and hasattr(self, "workdir"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- the API --------------------------------------------------------------

    async def _tunnels_of(self, timeout: float = 50.0) -> dict[int, Tunnel]:  # noqa: ASYNC109
        try:
            await asyncio.wait_for(self._published.wait(), timeout)
        except TimeoutError:
            ports = ", ".join(str(p.port) for p in self._ports)
            raise SandboxTimeoutError(
                f"The tunnels of sandbox {self.object_id} (ports {ports}) were not "
                f"published within {timeout:g}s"
            ) from None
        if self._error is not None:
            raise self._error
        if self._finished.is_set() or (self._ports and not self._tunnels):
            raise InvalidError(
                f"Sandbox {self.object_id} has ended (exit code {self._returncode}); "
                "its tunnels are closed"
            )
        return dict(self._tunnels)

    tunnels = _agent_loop_method(_tunnels_of)
    """``{port: Tunnel}`` of the declared ports, once all are published.

    Raises ``SandboxTimeoutError`` if that takes more than ``timeout`` seconds,
    the relay's error if it refused one, and ``InvalidError`` once the sandbox
    has ended. ``await sb.tunnels.aio()`` is the async form.
    """

    async def _wait(self, raise_on_termination: bool = True) -> None:
        await self._finished.wait()
        if self._error is not None:
            raise self._error
        if self._ended_by == "timeout":
            raise SandboxTimeoutError(
                f"Sandbox {self.object_id} ran past its timeout of {self._timeout:g}s "
                "and was killed"
            )
        if self._ended_by == "terminate" and raise_on_termination:
            raise SandboxTerminatedError(f"Sandbox {self.object_id} was terminated")

    wait = _agent_loop_method(_wait)
    """Wait for the sandbox to end; its tunnels are closed by then.

    Raises ``SandboxTimeoutError`` if it was killed for running past its
    timeout, and ``SandboxTerminatedError`` if ``terminate()`` ended it (unless
    ``raise_on_termination=False``). ``await sb.wait.aio()`` is the async form.
    """

    async def _terminate(self) -> None:
        if not self._finished.is_set():
            if self._ended_by is None and (self._proc is None or self._proc.returncode is None):
                self._ended_by = "terminate"
            if self._proc is None:
                self._runner.cancel()  # still publishing: the command never starts
            self._kill()
            await self._finished.wait()

    terminate = _agent_loop_method(_terminate)
    """Kill every process of the sandbox and close its tunnels; returns when done.
    Does nothing to a sandbox that has ended. ``await sb.terminate.aio()`` is the async form."""

    async def _wait_ready(
        self,
        port: int,
        timeout: float = 60.0,  # noqa: ASYNC109 - Modal-style name of the public API
        *,
        http_path: str | None = None,
    ) -> None:
        tunnel = self._tunnels.get(port)

        def gone() -> str | None:
            if not self._finished.is_set() and (
                self._proc is None or self._proc.returncode is None
            ):
                return None
            return f"sandbox {self.object_id} ended (exit code {self.poll()})"

        await ready.wait_ready(
            port,
            timeout=timeout,
            http_path=http_path,
            url=tunnel.url if tunnel else None,
            gone=gone,
        )

    wait_ready = _agent_loop_method(_wait_ready)
    """Wait until the server in the sandbox accepts connections on ``port``.

    ``sb.wait_ready(8000, timeout=60)``; with ``http_path="/"`` an HTTP/1.1
    GET must also get an answer below 500. Raises ``NotReadyError`` (naming
    the port, its URL and the reason) after ``timeout`` seconds, or at once
    if the sandbox ends first. ``await sb.wait_ready.aio(...)`` is the async form.
    """

    def poll(self) -> int | None:
        """The exit code if the sandbox has ended, else ``None`` (does not wait)."""
        return self._returncode

    @property
    def returncode(self) -> int | None:
        """The exit code once ended: the command's own, ``124`` after the timeout,
        ``137`` after ``terminate()``; ``None`` while it runs."""
        return self._returncode

    def __repr__(self) -> str:
        state = "running" if self._returncode is None else f"exit {self._returncode}"
        return f"<burrow.Sandbox {self.object_id} {state} {self.isolation.level.value}>"

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.terminate()

    async def __aenter__(self) -> Sandbox:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.terminate.aio()
