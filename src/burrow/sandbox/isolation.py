"""How a sandbox is kept apart from the machine: the levels, and the argv of each.

The argv is built by pure functions of a :class:`Host` (the few facts about
this machine it depends on) so that it can be tested without running
anything; only :meth:`Host.here` and the trial runs look at the machine.
"""

from __future__ import annotations

import enum
import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from burrow.exception import InvalidError

# How long the trial run of an isolation tool may take before it counts as broken.
PROBE_TIMEOUT: Final = 10.0

# The host user a sandbox runs as when root starts it. Mapping an id to root
# in a user namespace is not enough: the kernel still sees uid 0 outside, for
# files the sandbox can see and for the peers of its Unix sockets. Any
# unprivileged user would do; "nobody" owns no files and exists everywhere.
SANDBOX_USER_FOR_ROOT: Final = "nobody"
NOBODY_ID: Final = 65534  # nobody's uid and gid where no passwd entry names them

# Directories replaced by an empty tmpfs under bubblewrap: scratch space the
# sandbox gets its own of, and places where a host keeps sockets and secrets.
PRIVATE_DIRS: Final = ("/tmp", "/var/tmp", "/run", "/dev/shm")
SCRATCH_DIRS: Final = ("/tmp", "/var/tmp", "/dev/shm")
HOME_DIRS: Final = ("/root", "/home")
HIDDEN_DIRS: Final = (*PRIVATE_DIRS, *HOME_DIRS)

RESOLV_CONF: Final = "/etc/resolv.conf"


@dataclass(frozen=True)
class User:
    """A host user a sandbox runs as."""

    name: str
    uid: int
    gid: int

    @classmethod
    def named(cls, name: str) -> User:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            return cls(name, NOBODY_ID, NOBODY_ID)
        return cls(name, entry.pw_uid, entry.pw_gid)


class IsolationLevel(enum.StrEnum):
    """How far a sandbox is kept apart from the machine, best first."""

    BWRAP = "bwrap"
    """bubblewrap: read-only root, private /tmp and /run, home directories
    hidden, its own user (no capabilities), pid, ipc, uts and mount namespaces.
    Started by root, it runs the command as the unprivileged host user
    ``nobody`` instead of in a user namespace."""

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

    user: str = ""
    """The host user the command runs as, as the machine's kernel sees it: the
    starting process's own, or ``nobody`` when that is root (never root)."""

    uid: int = -1
    """That user's uid on the host."""

    def __str__(self) -> str:
        parts = [f"as {self.user}, uid {self.uid}"]
        parts.append(f"namespaces: {', '.join(self.namespaces) or 'none'}")
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

    sandbox_user: User = User(SANDBOX_USER_FOR_ROOT, NOBODY_ID, NOBODY_ID)
    """Who a sandbox runs as if ``uid`` is root."""

    user: str = ""
    """The name of ``uid``."""

    @classmethod
    def here(cls) -> Host:
        resolv = os.path.realpath(RESOLV_CONF)
        uid = os.getuid()
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = str(uid)
        return cls(
            uid=uid,
            dirs=frozenset(path for path in HIDDEN_DIRS if os.path.isdir(path)),
            resolv_conf=resolv if resolv.startswith("/run/") and os.path.exists(resolv) else None,
            setpriv=shutil.which("setpriv") is not None,
            sandbox_user=User.named(SANDBOX_USER_FOR_ROOT),
            user=user,
        )

    def runs_as(self) -> User | None:
        """The user a sandbox is switched to, if any: root's drop to an unprivileged one."""
        return self.sandbox_user if self.uid == 0 else None


def drop_args(user: User | None) -> list[str]:
    """``setpriv`` options that make the command ``user``, with no groups or capabilities left."""
    if user is None:
        return []
    return [
        f"--reuid={user.uid}",
        f"--regid={user.gid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ]


def bwrap_args(host: Host, hidden: Sequence[str], hostname: str) -> list[str]:
    """bubblewrap's options, without the binds of one sandbox's workdir and CA."""
    args = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for path in hidden:
        if path in host.dirs:
            # Scratch space is anyone's, as on the host: the sandbox's user may
            # not own it (bubblewrap started by root makes it root's).
            args += ["--perms", "01777"] if path in SCRATCH_DIRS else []
            args += ["--tmpfs", path]
    # A resolv.conf that points into /run (systemd-resolved) must survive /run going private.
    if host.resolv_conf is not None:
        args += ["--ro-bind", host.resolv_conf, host.resolv_conf]
    if host.uid != 0:
        args += ["--unshare-user"]
    # Started by root, bubblewrap does its mounts as root and the command is
    # made nobody by setpriv (see command_argv): a user namespace would map
    # the sandbox's id to host root, which is what the kernel goes by.
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
    """For the levels without --die-with-parent: no setuid gains, death with this
    process, and for root's sandboxes an unprivileged user.

    The parent-death signal follows the thread that started the process:
    sandboxes are started from the agent's thread, which lives as long as the
    process does.
    """
    if not host.setpriv:
        return []
    return ["setpriv", *drop_args(host.runs_as()), "--no-new-privs", "--pdeathsig", "KILL", "--"]


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
    user, uid = _who(host)
    if level is IsolationLevel.BWRAP:
        argv = bwrap_args(host, HIDDEN_DIRS, hostname)
        argv += _parents(HIDDEN_DIRS, [*shown, workdir, *([ca] if ca is not None else [])])
        for path in shown:
            argv += ["--ro-bind", path, path]
        argv += ["--bind", workdir, workdir]
        if ca is not None:
            argv += ["--ro-bind", ca, ca]
        argv += ["--chdir", workdir, "--", *_dropping(host), *command]
        namespaces = NAMESPACES[level]
        if host.runs_as() is not None:
            namespaces = tuple(n for n in namespaces if n != "user")
        return argv, Isolation(
            level,
            namespaces,
            read_only_root=True,
            private_dirs=tuple(d for d in HIDDEN_DIRS if d in host.dirs),
            user=user,
            uid=uid,
        )
    if level is IsolationLevel.UNSHARE:
        argv = [*unshare_args(host), *lifetime_args(host), *command]
        return argv, Isolation(level, NAMESPACES[level], user=user, uid=uid)
    return [*lifetime_args(host), *command], Isolation(level, user=user, uid=uid)


def _parents(hidden: Sequence[str], bound: Sequence[str]) -> list[str]:
    """Directories between a hidden directory and what is bound inside it, made searchable.

    bubblewrap would make them itself, but as root with mode 0700: out of the
    reach of the user the sandbox then runs as.
    """
    args: list[str] = []
    made: set[str] = set()
    for path in bound:
        top = next((d for d in hidden if under(path, d) and path != d), None)
        if top is None:
            continue
        parts = path.split("/")
        for depth in range(len(top.split("/")) + 1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent not in made:
                made.add(parent)
                args += ["--perms", "0755", "--dir", parent]
    return args


def _dropping(host: Host) -> list[str]:
    """Inside bubblewrap: for root's sandboxes, setpriv making the command an unprivileged user."""
    drop = host.runs_as()
    return [] if drop is None else ["setpriv", *drop_args(drop), "--no-new-privs", "--"]


def _who(host: Host) -> tuple[str, int]:
    drop = host.runs_as()
    if drop is not None:
        return drop.name, drop.uid
    return host.user or str(host.uid), host.uid


def unreachable(
    path: str, user: User, want: int, hidden: Sequence[str] = (), visible: Sequence[str] = ()
) -> str | None:
    """The part of ``path`` that ``user`` cannot get through, if any.

    Every directory above ``path`` must let the user search it, and ``path``
    grant the permission bits ``want`` (``os.R_OK | os.X_OK``, say). A
    directory that bubblewrap makes itself (one inside a ``hidden``
    directory and not inside a ``visible`` one) is searchable by all.
    """
    parts = path.rstrip("/").split("/")
    for depth in range(1, len(parts) + 1):
        current = "/".join(parts[:depth]) or "/"
        if any(under(current, d) for d in hidden) and not any(under(current, v) for v in visible):
            continue
        try:
            info = os.stat(current)
        except OSError:
            return current
        needed = want if depth == len(parts) else os.X_OK
        if not _grants(info, user, needed):
            return current
    return None


def _grants(info: os.stat_result, user: User, want: int) -> bool:
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid == user.uid:
        bits = mode >> 6
    elif info.st_gid == user.gid:
        bits = mode >> 3
    else:
        bits = mode
    return bits & want == want


# -- what works here ------------------------------------------------------------

_works: dict[IsolationLevel, str | None] = {}


def why_not(level: IsolationLevel) -> str | None:
    """``None`` if ``level`` works on this machine, else why not (a trial run, cached)."""
    if level in _works:
        return _works[level]
    true = shutil.which("true") or "/bin/true"
    host = Host.here()
    if host.runs_as() is not None and not host.setpriv:
        why: str | None = (
            f"started by root, a sandbox runs as {host.sandbox_user.name}, which takes "
            "setpriv (util-linux), and it is not installed"
        )
    elif level is IsolationLevel.BWRAP:
        if shutil.which("bwrap") is None:
            why = "bwrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
        else:
            why = _trial([*bwrap_args(host, HIDDEN_DIRS, "probe"), "--", *_dropping(host), true])
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
    raise InvalidError(f"no sandbox can run on this machine: {why_not(IsolationLevel.NONE)}")


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
