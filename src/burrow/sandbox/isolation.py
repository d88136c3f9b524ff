"""How a sandbox is kept apart from the machine: the levels, and the argv of each.

The argv is built by pure functions of a :class:`Host` (the few facts about
this machine it depends on) so that it can be tested without running
anything; only :meth:`Host.here` and the trial runs look at the machine.
"""

from __future__ import annotations

import enum
import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from burrow.exception import InvalidError

# How long the trial run of an isolation tool may take before it counts as broken.
PROBE_TIMEOUT: Final = 10.0

# The uid and gid a sandbox runs as when bubblewrap is started by root: an
# unprivileged id inside a user namespace holds no capabilities.
SANDBOX_ID_FOR_ROOT: Final = 65534

# Directories replaced by an empty tmpfs under bubblewrap: scratch space the
# sandbox gets its own of, and places where a host keeps sockets and secrets.
PRIVATE_DIRS: Final = ("/tmp", "/var/tmp", "/run", "/dev/shm")
HOME_DIRS: Final = ("/root", "/home")
HIDDEN_DIRS: Final = (*PRIVATE_DIRS, *HOME_DIRS)

RESOLV_CONF: Final = "/etc/resolv.conf"


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


NAMESPACES: Final = {
    IsolationLevel.BWRAP: ("user", "pid", "ipc", "uts", "mount", "cgroup"),
    IsolationLevel.UNSHARE: ("pid", "ipc", "uts", "mount"),
    IsolationLevel.NONE: (),
}


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


@dataclass(frozen=True)
class Host:
    """The facts about this machine that a sandbox's argv depends on."""

    uid: int
    dirs: frozenset[str]
    """Which of ``HIDDEN_DIRS`` exist here (only those get a tmpfs)."""

    resolv_conf: str | None = None
    """Where /etc/resolv.conf really is, if under /run (systemd-resolved)."""

    setpriv: bool = True
    """Whether ``setpriv`` is installed."""

    @classmethod
    def here(cls) -> Host:
        resolv = os.path.realpath(RESOLV_CONF)
        return cls(
            uid=os.getuid(),
            dirs=frozenset(path for path in HIDDEN_DIRS if os.path.isdir(path)),
            resolv_conf=resolv if resolv.startswith("/run/") and os.path.exists(resolv) else None,
            setpriv=shutil.which("setpriv") is not None,
        )


def bwrap_args(host: Host, hidden: Sequence[str], hostname: str) -> list[str]:
    """bubblewrap's options, without the binds of one sandbox's workdir and CA."""
    args = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for path in hidden:
        if path in host.dirs:
            args += ["--tmpfs", path]
    # A resolv.conf that points into /run (systemd-resolved) must survive /run going private.
    if host.resolv_conf is not None:
        args += ["--ro-bind", host.resolv_conf, host.resolv_conf]
    args += ["--unshare-user"]
    if host.uid == 0:
        args += ["--uid", str(SANDBOX_ID_FOR_ROOT), "--gid", str(SANDBOX_ID_FOR_ROOT)]
    # No --new-session: the sandbox is a session of its own already (it is
    # started with setsid, so it has no controlling terminal to inject input
    # into), and bubblewrap's init must stay in the process group that the
    # sandbox is killed by. With --new-session it leaves that group, and is
    # left behind with the command whenever the outer bwrap is killed before
    # the init has armed --die-with-parent: a sandbox ended just after it
    # started, by a program that exits, say.
    args += [
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--hostname",
        hostname,
        "--die-with-parent",
    ]
    return args


def unshare_args(host: Host) -> list[str]:
    args = ["unshare", "--fork", "--pid", "--mount-proc", "--ipc", "--uts", "--kill-child"]
    if host.uid != 0:
        args += ["--user", "--map-root-user"]
    return args


def lifetime_args(host: Host) -> list[str]:
    """For the levels without --die-with-parent: no setuid gains, death with this process.

    The parent-death signal follows the thread that started the process:
    sandboxes are started from the agent's thread, which lives as long as the
    process does.
    """
    if not host.setpriv:
        return []
    return ["setpriv", "--no-new-privs", "--pdeathsig", "KILL", "--"]


def under(path: str, directory: str) -> bool:
    """Whether ``path`` is ``directory`` or inside it (both absolute and real)."""
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def shown_dirs(hidden: Iterable[str], wanted: Iterable[str]) -> list[str]:
    """Those of ``wanted`` that lie inside a hidden directory, to be shown again.

    A hidden directory itself is never shown again: that would undo hiding it.
    """
    hidden = list(hidden)
    return sorted({path for path in wanted if any(under(path, d) and path != d for d in hidden)})


def hiding(program: str, hidden: Iterable[str], visible: Iterable[str]) -> str | None:
    """The hidden directory that keeps ``program`` out of the sandbox, if one does."""
    visible = list(visible)
    for directory in hidden:
        if under(program, directory) and not any(under(program, v) for v in visible):
            return directory
    return None


def command_argv(
    level: IsolationLevel,
    host: Host,
    command: Sequence[str],
    *,
    hostname: str,
    workdir: str,
    shown: Sequence[str] = (),
    ca: str | None = None,
) -> tuple[list[str], Isolation]:
    """The argv that runs ``command`` (its program an absolute path) at ``level``.

    Under bubblewrap, ``workdir`` is bound writable, ``shown`` and ``ca``
    read-only, and the command starts in ``workdir``.
    """
    if level is IsolationLevel.BWRAP:
        argv = bwrap_args(host, HIDDEN_DIRS, hostname)
        for path in shown:
            argv += ["--ro-bind", path, path]
        argv += ["--bind", workdir, workdir]
        if ca is not None:
            argv += ["--ro-bind", ca, ca]
        argv += ["--chdir", workdir, "--", *command]
        return argv, Isolation(
            level,
            NAMESPACES[level],
            read_only_root=True,
            private_dirs=tuple(d for d in HIDDEN_DIRS if d in host.dirs),
        )
    if level is IsolationLevel.UNSHARE:
        argv = [*unshare_args(host), *lifetime_args(host), *command]
        return argv, Isolation(level, NAMESPACES[level])
    return [*lifetime_args(host), *command], Isolation(level)


# -- what works here ------------------------------------------------------------

_works: dict[IsolationLevel, str | None] = {}


def why_not(level: IsolationLevel) -> str | None:
    """``None`` if ``level`` works on this machine, else why not (a trial run, cached)."""
    if level in _works:
        return _works[level]
    true = shutil.which("true") or "/bin/true"
    host = Host.here()
    if level is IsolationLevel.BWRAP:
        if shutil.which("bwrap") is None:
            why: str | None = "bwrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
        else:
            why = _trial([*bwrap_args(host, HIDDEN_DIRS, "probe"), "--", true])
    elif level is IsolationLevel.UNSHARE:
        if shutil.which("unshare") is None:
            why = "unshare is not installed (util-linux)"
        else:
            why = _trial([*unshare_args(host), *lifetime_args(host), true])
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
        if why_not(level) is None:
            return level
    raise AssertionError("a plain process always works")


def choose(requested: str) -> IsolationLevel:
    """The level for ``isolation=requested``; raises ``InvalidError`` if it cannot be had."""
    if requested == "auto":
        return available_isolation()
    try:
        level = IsolationLevel(requested)
    except ValueError:
        choices = ", ".join(["auto", *IsolationLevel])
        raise InvalidError(f"isolation must be one of {choices}, not {requested!r}") from None
    why = why_not(level)
    if why is not None:
        raise InvalidError(f"isolation {level.value!r} does not work on this machine: {why}")
    return level
