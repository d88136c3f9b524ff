"""The argv of each isolation level, and which directories are hidden or shown:
built from a :class:`Host` of our making, so nothing runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from burrow.sandbox.isolation import (
    HIDDEN_DIRS,
    Host,
    IsolationLevel,
    User,
    command_argv,
    hiding,
    shown_dirs,
    under,
    unreachable,
)

USER = Host(uid=1000, dirs=frozenset(HIDDEN_DIRS), setpriv=True, user="alice")
NOBODY = User("nobody", 65534, 65534)
ROOT = Host(uid=0, dirs=frozenset(HIDDEN_DIRS), setpriv=True, sandbox_user=NOBODY, user="root")
COMMAND = ["/usr/bin/python3", "-m", "http.server"]
SETPRIV = ["setpriv", "--no-new-privs", "--pdeathsig", "KILL", "--"]
AS_NOBODY = [
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all",
    "--bounding-set=-all",
]


def _argv(
    level: IsolationLevel, host: Host = USER, shown: list[str] | None = None, ca: str | None = None
) -> list[str]:
    argv, _ = command_argv(
        level, host, COMMAND, hostname="sb-x", workdir="/w", shown=shown or [], ca=ca
    )
    return argv


def _pairs(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == option]


# -- bubblewrap ---------------------------------------------------------------------


def test_bwrap_runs_the_command_last_in_its_workdir() -> None:
    argv = _argv(IsolationLevel.BWRAP)
    assert argv[0] == "bwrap"
    assert argv[-5:] == ["/w", "--", *COMMAND]
    assert argv[argv.index("--chdir") + 1] == "/w"
    assert argv[argv.index("--bind") + 1 : argv.index("--bind") + 3] == ["/w", "/w"]
    assert argv[1:5] == ["--ro-bind", "/", "/", "--dev"]


def test_bwrap_namespaces_and_lifetime() -> None:
    argv = _argv(IsolationLevel.BWRAP)
    for option in ("--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts"):
        assert option in argv
    assert "--unshare-net" not in argv  # the agent reaches the sandbox's ports on 127.0.0.1
    assert "--die-with-parent" in argv
    assert _pairs(argv, "--hostname") == ["sb-x"]


def test_bwrap_keeps_its_init_in_the_process_group_that_is_killed() -> None:
    # With --new-session bubblewrap's init leaves the group, and outlives a
    # kill that lands before it has armed --die-with-parent.
    assert "--new-session" not in _argv(IsolationLevel.BWRAP)


def test_bwrap_hides_only_the_directories_that_exist() -> None:
    host = Host(uid=1000, dirs=frozenset({"/tmp", "/home"}))
    argv, isolation = command_argv(
        IsolationLevel.BWRAP, host, COMMAND, hostname="sb-x", workdir="/w"
    )
    assert _pairs(argv, "--tmpfs") == ["/tmp", "/home"]
    assert isolation.private_dirs == ("/tmp", "/home")
    assert isolation.read_only_root
    assert "user" in isolation.namespaces and "pid" in isolation.namespaces


def test_bwrap_as_root_runs_the_command_as_nobody_on_the_host() -> None:
    # Not a user namespace mapping an id to root: the host's kernel would still see root.
    argv, isolation = command_argv(
        IsolationLevel.BWRAP, ROOT, COMMAND, hostname="sb-x", workdir="/w"
    )
    assert "--unshare-user" not in argv and "--uid" not in argv
    assert argv[argv.index("--") + 1 :] == ["setpriv", *AS_NOBODY, "--no-new-privs", "--", *COMMAND]
    assert "user" not in isolation.namespaces
    assert (isolation.user, isolation.uid) == ("nobody", 65534)
    assert str(isolation).startswith("bwrap (as nobody, uid 65534; ")
    # A user's own sandbox keeps its user namespace, and its user.
    argv, isolation = command_argv(
        IsolationLevel.BWRAP, USER, COMMAND, hostname="sb-x", workdir="/w"
    )
    assert "--unshare-user" in argv and "setpriv" not in argv
    assert (isolation.user, isolation.uid) == ("alice", 1000)


@pytest.mark.parametrize("level", [IsolationLevel.UNSHARE, IsolationLevel.NONE])
def test_without_bwrap_root_runs_the_command_as_nobody_too(level: IsolationLevel) -> None:
    argv, isolation = command_argv(level, ROOT, COMMAND, hostname="sb-x", workdir="/w")
    start = argv.index("setpriv")
    assert argv[start:] == ["setpriv", *AS_NOBODY, *SETPRIV[1:], *COMMAND]
    assert (isolation.user, isolation.uid) == ("nobody", 65534)


def test_what_the_sandbox_user_cannot_reach(tmp_path: Path) -> None:
    me = User("me", os.getuid(), os.getgid())
    other = User("other", 54321, 54321)
    private = tmp_path / "private"
    (private / "inner").mkdir(parents=True)
    private.chmod(0o700)
    inner = str(private / "inner")
    assert unreachable(inner, me, os.R_OK | os.X_OK) is None
    # Inside a directory bubblewrap hides (here: all), it makes the parents of what it shows.
    assert unreachable(inner, other, os.X_OK, hidden=["/"], visible=[str(private)]) == str(private)
    assert unreachable(inner, other, os.X_OK, hidden=["/"], visible=[inner]) is None
    assert unreachable(str(tmp_path / "missing"), me, os.X_OK) == str(tmp_path / "missing")


def test_bwrap_binds_shown_dirs_and_the_ca_read_only() -> None:
    argv = _argv(IsolationLevel.BWRAP, shown=["/root/.pyenv"], ca="/etc/burrow/ca.pem")
    ro = _pairs(argv, "--ro-bind")
    assert ro == ["/", "/root/.pyenv", "/etc/burrow/ca.pem"]
    # The shown dirs come after the tmpfs that hides their parent, or the tmpfs would cover them.
    assert argv.index("/root/.pyenv") > argv.index("/root")


def test_bwrap_keeps_a_resolv_conf_that_lives_in_run() -> None:
    resolv = "/run/systemd/resolve/stub-resolv.conf"
    host = Host(uid=1000, dirs=frozenset(HIDDEN_DIRS), resolv_conf=resolv)
    argv = _argv(IsolationLevel.BWRAP, host)
    assert resolv in _pairs(argv, "--ro-bind")
    assert argv.index(resolv) > argv.index("/run")
    assert resolv not in _argv(IsolationLevel.BWRAP, USER)


# -- unshare and none -----------------------------------------------------------------


def test_unshare_as_a_user_maps_root_in_a_user_namespace() -> None:
    argv, isolation = command_argv(
        IsolationLevel.UNSHARE, USER, COMMAND, hostname="sb-x", workdir="/w"
    )
    assert argv == [
        "unshare",
        "--fork",
        "--pid",
        "--mount-proc",
        "--ipc",
        "--uts",
        "--kill-child",
        "--user",
        "--map-root-user",
        *SETPRIV,
        *COMMAND,
    ]
    assert isolation.namespaces == ("pid", "ipc", "uts", "mount")
    assert not isolation.read_only_root and not isolation.private_dirs


def test_unshare_as_root_needs_no_user_namespace() -> None:
    argv = _argv(IsolationLevel.UNSHARE, ROOT)
    assert "--user" not in argv and "--map-root-user" not in argv


def test_none_is_the_command_with_its_lifetime_bound_to_ours() -> None:
    argv, isolation = command_argv(
        IsolationLevel.NONE, USER, COMMAND, hostname="sb-x", workdir="/w"
    )
    assert argv == [*SETPRIV, *COMMAND]
    assert isolation.namespaces == ()
    assert str(isolation) == "none (as alice, uid 1000; namespaces: none; network shared)"


def test_without_setpriv_the_command_runs_as_is() -> None:
    host = Host(uid=1000, dirs=frozenset(), setpriv=False)
    assert _argv(IsolationLevel.NONE, host) == COMMAND


# -- hidden and visible directories -----------------------------------------------------


@pytest.mark.parametrize(
    ("path", "directory", "inside"),
    [
        ("/tmp", "/tmp", True),
        ("/tmp/x", "/tmp", True),
        ("/tmp/x", "/tmp/", True),
        ("/tmpfoo", "/tmp", False),
        ("/", "/tmp", False),
    ],
)
def test_under(path: str, directory: str, inside: bool) -> None:
    assert under(path, directory) is inside


def test_shown_dirs_are_those_inside_a_hidden_one() -> None:
    wanted = ["/root/.pyenv/versions/3.11", "/usr", "/tmp/venv", "/tmp/venv", "/home", "/tmpx"]
    assert shown_dirs(HIDDEN_DIRS, wanted) == ["/root/.pyenv/versions/3.11", "/tmp/venv"]


def test_a_hidden_dir_itself_is_never_shown_again() -> None:
    assert shown_dirs(HIDDEN_DIRS, ["/home", "/tmp", "/root"]) == []


def test_a_program_in_a_hidden_dir_is_refused_unless_visible() -> None:
    assert hiding("/tmp/tool", HIDDEN_DIRS, ["/w"]) == "/tmp"
    assert hiding("/home/me/bin/tool", HIDDEN_DIRS, ["/w"]) == "/home"
    assert hiding("/tmp/venv/bin/python", HIDDEN_DIRS, ["/w", "/tmp/venv"]) is None
    assert hiding("/tmp/w/tool", HIDDEN_DIRS, ["/tmp/w"]) is None  # in the workdir
    assert hiding("/usr/bin/python3", HIDDEN_DIRS, ["/w"]) is None
