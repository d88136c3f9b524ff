"""``burrow.Sandbox``: run a command apart from the machine, with its ports published.

The command runs under bubblewrap when it works here (read-only root,
private /tmp, its own user, pid, ipc and uts namespaces), else in namespaces
from ``unshare``, else as a plain process group (``isolation.py`` builds
each). This process's agent forwards the declared ports under the sandbox's
workload id until the command ends or its timeout passes; then every
process of the sandbox is killed, its workdir removed and the tunnels closed.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Final

from burrow._aio import dual_method
from burrow.agent.client import Client, forward, runtime, workload_env
from burrow.agent.session import AgentConfig, pin_relay
from burrow.exception import (
    Error,
    InvalidError,
    SandboxTerminatedError,
    SandboxTimeoutError,
)
from burrow.net import ready
from burrow.sandbox.isolation import (
    HIDDEN_DIRS,
    Host,
    Isolation,
    IsolationLevel,
    choose,
    command_argv,
    hiding,
    shown_dirs,
    unreachable,
)
from burrow.sandbox.streams import (
    SandboxStream,
    agent_loop_method,
    on_agent_loop,
    on_agent_loop_async,
)
from burrow.tunnel import Tunnel
from burrow.wire import allowlist

log = logging.getLogger("burrow.sandbox")

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

# How long ending the sandboxes still running may hold up the interpreter's
# exit; all end at once, each within about PUMP_DRAIN_TIMEOUT.
AT_EXIT_TIMEOUT: Final = 10.0

# Modal's default lifetime of a sandbox, and its upper bound (24 hours).
DEFAULT_TIMEOUT: Final = 300
MAX_TIMEOUT: Final = 24 * 3600

# The only variables a sandbox inherits from this process: a sandbox should
# not see the secrets of the program that starts it.
PASSED_ENV: Final = ("PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TERM", "TZ")


def _python_prefixes() -> set[str]:
    return {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}


def _burrow_root() -> str:
    """The directory burrow is imported from (site-packages, or a source tree's src/)."""
    package = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))  # .../burrow
    return os.path.dirname(package)


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
    All are ended at once, under one deadline: ended one by one, a few slow
    ones would use up the time of the others.
    """
    running = [runtime.submit(sb._terminate()) for sb in list(_live) if sb.poll() is None]
    if running:
        concurrent.futures.wait(running, timeout=AT_EXIT_TIMEOUT)


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

    create = dual_method(_create_sandbox, on_agent_loop, on_agent_loop_async, on_class=True)
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
        level = await asyncio.to_thread(choose, isolation)

        self.object_id = "sb-" + secrets.token_urlsafe(12)
        self._timeout = float(timeout)
        self._ports = ports
        self._allow = inbound_cidr_allowlist
        base = (client or Client()).config()
        # Every port of the sandbox, and every process in it, on one relay.
        self._config: AgentConfig = replace(await _pinned(base), workload=self.object_id)
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
        self._ca_dir: str | None = None
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
        host = Host.here()
        drop = host.runs_as()
        if workdir_arg is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"burrow-{self.object_id}-"))
            if drop is not None:
                os.chown(self.workdir, drop.uid, drop.gid)
        else:
            self.workdir = Path(os.path.realpath(workdir_arg))
            if not os.path.isdir(self.workdir):
                raise InvalidError(f"workdir {str(workdir_arg)!r} is not a directory")
        workdir = str(self.workdir)
        base = {name: os.environ[name] for name in PASSED_ENV if name in os.environ}
        base["HOME"] = workdir
        base.update(env or {})
        child_env = workload_env(self._config, base)

        program = cmd[0]
        if "/" in program:
            path = os.path.join(workdir, program)
            found = path if os.access(path, os.X_OK) and os.path.isfile(path) else None
        else:
            found = shutil.which(program, path=child_env.get("PATH", os.defpath))
        if found is None:
            raise InvalidError(f"Cannot run {program!r}: no such executable file")
        found = os.path.abspath(found)

        shown: list[str] = []
        if level is IsolationLevel.BWRAP:
            # Home directories and /tmp are hidden, but the Python running burrow
            # (pyenv, or a virtualenv under /tmp, say), burrow itself (an editable
            # install's source tree) and the prefix of the command's bin/
            # directory are shown again, read-only, if they live there.
            real = os.path.realpath(found)
            shown = shown_dirs(
                HIDDEN_DIRS,
                [
                    *(os.path.realpath(p) for p in _python_prefixes()),
                    _burrow_root(),
                    os.path.dirname(os.path.dirname(real)),
                ],
            )
            hidden_by = hiding(real, HIDDEN_DIRS, [workdir, *shown])
            if hidden_by is not None:
                raise InvalidError(
                    f"Cannot run {found!r} in the sandbox: {hidden_by} is private there; "
                    "put it in the workdir or elsewhere"
                )
        if drop is not None:
            # Root's sandbox runs as an unprivileged user, who must be able to
            # use its workdir and run its command.
            hidden = HIDDEN_DIRS if level is IsolationLevel.BWRAP else ()
            visible = [workdir, *shown]
            who = f"{drop.name}, the user a sandbox started by root runs as"
            blocked = unreachable(workdir, drop, os.R_OK | os.W_OK | os.X_OK, hidden, visible)
            if blocked is not None:
                raise InvalidError(
                    f"workdir {workdir!r} is not usable by {who} ({blocked} keeps it out); "
                    f"give it to that user (chown {drop.name}) or leave workdir unset"
                )
            for path in (found, os.path.realpath(found)):
                blocked = unreachable(path, drop, os.X_OK, hidden, visible)
                if blocked is not None:
                    raise InvalidError(
                        f"Cannot run {found!r} in the sandbox: {blocked} is out of reach of {who}"
                    )
        ca = str(self._config.ca.resolve()) if self._config.ca is not None else None
        if drop is not None and ca is not None:
            hidden = HIDDEN_DIRS if level is IsolationLevel.BWRAP else ()
            if unreachable(ca, drop, os.R_OK, hidden, [ca]) is not None:
                ca = self._readable_copy(ca)
        argv, self.isolation = command_argv(
            level,
            host,
            [found, *cmd[1:]],
            hostname=self.object_id,
            workdir=workdir,
            shown=shown,
            ca=ca,
        )
        if ca is not None:
            child_env["BURROW_CA"] = ca
        return argv, child_env

    def _readable_copy(self, ca: str) -> str:
        """A copy of the relay's CA certificate (public) that the sandbox's user can read."""
        self._ca_dir = tempfile.mkdtemp(prefix=f"burrow-{self.object_id}-ca-")
        os.chmod(self._ca_dir, 0o755)
        copy = os.path.join(self._ca_dir, "ca.pem")
        shutil.copyfile(ca, copy)
        os.chmod(copy, 0o644)
        return copy

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
                # Nothing of the sandbox runs now: its workdir goes first, so
                # that nothing below (a silent relay, pipes held open) can keep
                # it when the interpreter's exit stops waiting. Not in a worker
                # thread: at interpreter exit no new ones may start.
                self._remove_workdir()
                self._published.set()
                await self._close_tunnels()
                if pumps:
                    # Output still in the pipes is read to the end, unless someone
                    # outside the sandbox's process group holds them open.
                    await asyncio.wait(pumps, timeout=PUMP_DRAIN_TIMEOUT)
                    for pump in pumps:
                        pump.cancel()
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
            relay=self._config.relay,
            token=self._config.token,
            ca=self._config.ca,
            plain_data=self._config.plain_data,
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
        # All at once: each may wait a moment for a silent relay.
        results = await asyncio.gather(
            *(fw._close() for fw in self._forwards), return_exceptions=True
        )
        for fw, result in zip(self._forwards, results, strict=True):
            if isinstance(result, Error):  # the relay may be gone; the tunnel goes with the session
                log.debug("sandbox %s: closing port %d: %s", self.object_id, fw.port, result)
            elif isinstance(result, BaseException):
                raise result
        if self._ports:
            await runtime.close_session(self._config)

    def _remove_workdir(self) -> None:
        if self._own_workdir and hasattr(self, "workdir"):
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self._ca_dir is not None:
            shutil.rmtree(self._ca_dir, ignore_errors=True)

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

    tunnels = agent_loop_method(_tunnels_of)
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

    wait = agent_loop_method(_wait)
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

    terminate = agent_loop_method(_terminate)
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

    wait_ready = agent_loop_method(_wait_ready)
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


async def _pinned(config: AgentConfig) -> AgentConfig:
    """The sandbox's relay, picked once on the agent's loop (one relay: as given)."""
    if len(config.relays) == 1:
        return config
    return await asyncio.wrap_future(runtime.submit(pin_relay(config)))
