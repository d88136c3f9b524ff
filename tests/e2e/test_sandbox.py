"""burrow.Sandbox: real processes in real isolation, their ports published through a real relay."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from backends import free_port
from devrelay import BURROW, dev_relay, stop
from harness import RelayHarness, wait_until

import burrow
from burrow.agent.client import runtime
from burrow.exception import (
    InvalidError,
    NotReadyError,
    SandboxTerminatedError,
    SandboxTimeoutError,
)
from burrow.sandbox import IsolationLevel, isolation
from burrow.sandbox import core as sandbox

PY = sys.executable
REPO = Path(__file__).resolve().parents[2]


def _serve(port: int) -> list[str]:
    """A web server on 127.0.0.1:port serving the sandbox's workdir."""
    return [PY, "-m", "http.server", str(port), "--bind", "127.0.0.1"]


def _curl(relay: RelayHarness, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--cacert", str(relay.ca), *args, url],
        capture_output=True,
        text=True,
        timeout=30,
    )


def _for_the_sandbox(path: Path) -> Path:
    """``path``, given to the user a sandbox runs as (nobody, when these tests run as root)."""
    if os.getuid() == 0:
        user = isolation.Host.here().sandbox_user
        os.chown(path, user.uid, user.gid)
    return path


def _level_or_skip(level: IsolationLevel) -> None:
    why = isolation.why_not(level)
    if why is not None:
        pytest.skip(f"isolation {level.value} does not work on this machine: {why}")


@pytest.fixture
def outside() -> Iterator[Path]:
    """A directory the test process may write, outside /tmp and the home directories."""
    path = REPO / ".pytest_cache" / f"sandbox-outside-{secrets.token_hex(4)}"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path)


# -- publishing -----------------------------------------------------------------


def test_ports_are_published_while_the_sandbox_lives(relay: RelayHarness, tmp_path: Path) -> None:
    web, raw = free_port(), free_port()
    (tmp_path / "hello.txt").write_text("hello from the sandbox\n")
    sb = burrow.Sandbox.create(
        *_serve(web),
        encrypted_ports=[web],
        unencrypted_ports=[raw],
        workdir=_for_the_sandbox(tmp_path),
        client=relay.client(),
    )
    try:
        tunnels = sb.tunnels()
        assert set(tunnels) == {web, raw}
        assert tunnels[web].url.startswith("https://") and tunnels[web].local_port == web
        assert tunnels[web].unencrypted_port is None
        host, tcp_port = tunnels[raw].tcp_socket
        assert tcp_port > 0
        sb.wait_ready(web, timeout=30, http_path="/hello.txt")
        page = _curl(relay, tunnels[web].url + "/hello.txt")
        assert page.returncode == 0, page.stderr
        assert page.stdout == "hello from the sandbox\n"
        assert sb.poll() is None and sb.returncode is None
    finally:
        sb.terminate()
    assert sb.returncode == sandbox.EXIT_TERMINATED
    with pytest.raises(SandboxTerminatedError):
        sb.wait()
    sb.wait(raise_on_termination=False)
    # The tunnels went with it: the relay no longer knows the name, nor the TCP port.
    gone = _curl(relay, tunnels[web].url + "/hello.txt")
    assert "no tunnel" in gone.stdout
    with pytest.raises(OSError):
        socket.create_connection((host, tcp_port), timeout=10).close()
    with pytest.raises(InvalidError, match="has ended"):
        sb.tunnels()
    # The workdir was the caller's: it stays.
    assert (tmp_path / "hello.txt").exists()


def test_the_sandbox_ends_with_its_command(relay: RelayHarness) -> None:
    web = free_port()
    script = "import sys; print('out line'); print('err line', file=sys.stderr); sys.exit(3)"
    sb = burrow.Sandbox.create(PY, "-c", script, encrypted_ports=[web], client=relay.client())
    sb.wait()  # ended by itself: no error
    assert sb.returncode == 3 and sb.poll() == 3
    assert sb.stdout.read() == "out line\n"
    assert list(sb.stderr) == ["err line\n"]
    assert sb.stdout.read() == ""  # read once
    # Its own workdir is removed with it.
    assert not sb.workdir.exists()
    with pytest.raises(InvalidError, match="has ended"):
        sb.tunnels()


def test_timeout_kills_the_sandbox_and_closes_its_tunnels(relay: RelayHarness) -> None:
    web = free_port()
    sb = burrow.Sandbox.create(
        *_serve(web), encrypted_ports=[web], timeout=2, client=relay.client()
    )
    url = sb.tunnels()[web].url
    sb.wait_ready(web, timeout=30)
    assert _curl(relay, url + "/", "--fail").returncode == 0
    with pytest.raises(SandboxTimeoutError, match="timeout of 2s"):
        sb.wait()
    assert sb.returncode == sandbox.EXIT_TIMEOUT
    assert "no tunnel" in _curl(relay, url + "/").stdout
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", web), timeout=10).close()


def test_tunnels_raise_sandbox_timeout_error_when_publishing_hangs() -> None:
    # A "relay" that accepts and never answers: the agent's handshake cannot finish.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        client = burrow.Client(relay=f"r1.localhost:{silent.getsockname()[1]}", token="a.b.c")
        sb = burrow.Sandbox.create(
            PY, "-c", "print('never runs')", encrypted_ports=[free_port()], client=client
        )
        try:
            with pytest.raises(SandboxTimeoutError, match=r"not published within 0\.2s"):
                sb.tunnels(timeout=0.2)
            assert sb.poll() is None
        finally:
            sb.terminate()
    assert sb.returncode == sandbox.EXIT_TERMINATED
    # The command starts only once its ports are published: it never ran.
    assert sb.stdout.read() == ""


def test_a_relay_refusal_fails_the_sandbox_without_running_it(relay: RelayHarness) -> None:
    port, other = free_port(), free_port()
    with burrow.forward(port, client=relay.client()):
        # This process already forwards the port; the sandbox shares its network.
        sb = burrow.Sandbox.create(
            PY, "-c", "print('ran')", encrypted_ports=[port, other], client=relay.client()
        )
        with pytest.raises(InvalidError, match=f"Port {port} is already forwarded"):
            sb.tunnels()
        with pytest.raises(InvalidError, match="already forwarded"):
            sb.wait()
    assert sb.returncode == sandbox.EXIT_NOT_STARTED
    # The port that could be published was unpublished with the failure.
    assert other not in runtime.forwarded_ports
    assert sb.stdout.read() == ""


# -- workload ---------------------------------------------------------------------

_FORWARDS = """
import subprocess, sys
import burrow
declared, other = int(sys.argv[1]), int(sys.argv[2])
try:
    with burrow.forward(declared):
        print("declared: forwarded")
except burrow.exception.InvalidError as exc:
    print("declared:", exc)
with burrow.forward(other) as tunnel:
    print("other:", tunnel.url, flush=True)
    second = subprocess.run(
        [sys.executable, "-c", sys.argv[3], str(other)], capture_output=True, text=True
    )
    print(second.stdout.strip() or second.stderr.strip())
"""
_SECOND = """
import sys
import burrow
try:
    with burrow.forward(int(sys.argv[1])):
        print("second: forwarded")
except burrow.exception.InvalidError as exc:
    print("second:", exc)
"""


def test_forward_inside_the_sandbox_is_one_workload_with_its_ports(
    relay: RelayHarness,
) -> None:
    declared, other = free_port(), free_port()
    sb = burrow.Sandbox.create(
        PY, "-c", _FORWARDS, str(declared), str(other), _SECOND,
        encrypted_ports=[declared],
        client=relay.client(),
    )  # fmt: skip
    sb.wait()
    err = sb.stderr.read()
    lines = sb.stdout.read().splitlines()
    assert sb.returncode == 0, err
    assert lines[0] == f"declared: Port {declared} is already forwarded"
    assert lines[1].startswith("other: https://")
    assert lines[2] == f"second: Port {other} is already forwarded"


_SHOW = """
import json, os, socket, sys
def attempt(path):
    try:
        with open(path, "w") as f:
            f.write("x")
        return "written"
    except OSError as exc:
        return type(exc).__name__
print(json.dumps({
    "pid": os.getpid(),
    "uid": os.getuid(),
    "hostname": socket.gethostname(),
    "cwd": os.getcwd(),
    "env": dict(os.environ),
    "outside": attempt(sys.argv[1]),
    "workdir": attempt("inside.txt"),
    "tmp": attempt(sys.argv[3]),
    "sees_host_tmp": os.path.exists(sys.argv[2]),
    "sees_root_home": os.path.exists("/root/.bashrc") or os.path.exists("/root/.profile"),
}))
"""


@pytest.mark.parametrize("level", list(IsolationLevel))
def test_isolation_levels(
    level: IsolationLevel,
    relay: RelayHarness,
    tmp_path: Path,
    outside: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _level_or_skip(level)
    monkeypatch.setenv("PARENT_SECRET", "hunter2")
    host_tmp_marker = tmp_path / "host-only"
    host_tmp_marker.write_text("x")
    python, workdir = PY, tmp_path / "work"
    if os.getuid() == 0 and level is not IsolationLevel.BWRAP:
        # Root's sandbox runs as nobody; without bubblewrap's binds, root's
        # Python (under /root) and pytest's temporary directories are out of its reach.
        python, workdir = "/usr/bin/python3", outside / "work"
        if not os.path.exists(python):
            pytest.skip(f"{python} is not installed")
    workdir.mkdir()
    _for_the_sandbox(workdir)
    in_tmp = Path("/tmp") / f"burrow-sandbox-test-{secrets.token_hex(4)}"
    sb = burrow.Sandbox.create(
        python, "-c", _SHOW, str(outside / "escaped.txt"), str(host_tmp_marker), str(in_tmp),
        workdir=workdir,
        env={"GREETING": "hi"},
        isolation=level.value,
        client=relay.client(),
    )  # fmt: skip
    sb.wait()
    err = sb.stderr.read()
    assert sb.returncode == 0, err
    seen = json.loads(sb.stdout.read())
    assert sb.isolation.level is level
    assert sb.isolation.network == "shared"

    # Every level: the environment is the sandbox's own, not the parent's.
    env = seen["env"]
    assert env["GREETING"] == "hi" and "PARENT_SECRET" not in env
    assert env["BURROW_WORKLOAD"] == sb.object_id
    assert env["BURROW_RELAY"] == relay.address
    assert env["HOME"] == str(workdir) and seen["cwd"] == str(workdir)
    assert seen["workdir"] == "written" and (workdir / "inside.txt").exists()

    if level is not IsolationLevel.BWRAP:
        in_tmp.unlink(missing_ok=True)  # the host's /tmp: theirs is not private
    if level is IsolationLevel.NONE:
        assert sb.isolation.namespaces == ()
        return
    assert seen["pid"] <= 3, "a pid namespace of its own"  # pid 1 is its init
    assert "pid" in sb.isolation.namespaces
    if level is IsolationLevel.UNSHARE:
        return
    # bubblewrap: nothing written outside the workdir reaches the machine.
    assert seen["outside"] != "written"
    assert not (outside / "escaped.txt").exists()
    assert seen["tmp"] == "written" and not in_tmp.exists()
    assert not seen["sees_host_tmp"]
    assert not seen["sees_root_home"]
    assert seen["hostname"] == sb.object_id
    assert sb.isolation.read_only_root and "/tmp" in sb.isolation.private_dirs
    assert seen["uid"] == sb.isolation.uid != 0
    assert str(sb.isolation).startswith("bwrap (")


_PROBE = """
import json, os, socket, sys
def read(path):
    try:
        with open(path, "rb") as f:
            f.read(1)
        return "read"
    except OSError as exc:
        return type(exc).__name__
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
    sock.connect("\\0" + sys.argv[2])
    sock.recv(1)
print(json.dumps({"uid": os.getuid(), "secret": read(sys.argv[1]), "shadow": read("/etc/shadow")}))
"""


def _peer_uids(name: str) -> tuple[threading.Thread, list[int]]:
    """A host abstract Unix socket ``name``: the uid of the one peer that connects (SO_PEERCRED)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind("\0" + name)
    server.listen(1)
    server.settimeout(60)
    uids: list[int] = []

    def accept() -> None:
        with server, contextlib.suppress(TimeoutError):
            conn, _ = server.accept()
            with conn:
                creds = conn.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
                )
                uids.append(struct.unpack("3i", creds)[1])
                conn.sendall(b"!")

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return thread, uids


@pytest.mark.parametrize("level", list(IsolationLevel))
def test_a_sandbox_started_by_root_is_not_root_on_the_host(
    level: IsolationLevel, relay: RelayHarness, outside: Path
) -> None:
    if os.getuid() != 0:
        pytest.skip("what a sandbox started by root may do needs root to check")
    _level_or_skip(level)
    secret = outside / "root-only"
    secret.write_text("root's secret\n")
    secret.chmod(0o600)
    name = f"burrow-test-{secrets.token_hex(6)}"
    accepting, peer_uids = _peer_uids(name)
    # Without bubblewrap's binds the command runs from the machine's own file
    # system, where root's Python (under /root) is out of an unprivileged user's reach.
    python = PY if level is IsolationLevel.BWRAP else "/usr/bin/python3"
    if not os.path.exists(python):
        pytest.skip(f"{python} is not installed")
    sb = burrow.Sandbox.create(
        python, "-c", _PROBE, str(secret), name, isolation=level.value, client=relay.client()
    )
    sb.wait()
    assert sb.returncode == 0, sb.stderr.read()
    seen = json.loads(sb.stdout.read())
    accepting.join(timeout=60)
    # The host's kernel sees an unprivileged user, not root in disguise.
    assert peer_uids and peer_uids[0] != 0
    # (A checkout under /tmp or a home directory is hidden from bubblewrap's sandboxes.)
    hidden = level is IsolationLevel.BWRAP and any(
        isolation.under(str(outside), d) for d in isolation.HIDDEN_DIRS
    )
    assert seen["secret"] == ("FileNotFoundError" if hidden else "PermissionError")
    assert seen["shadow"] == "PermissionError"
    assert sb.isolation.uid == peer_uids[0] == isolation.Host.here().sandbox_user.uid
    assert f"as {sb.isolation.user}, uid {sb.isolation.uid}" in str(sb.isolation)


def test_terminate_kills_every_process_of_the_sandbox(relay: RelayHarness, tmp_path: Path) -> None:
    _level_or_skip(isolation.available_isolation())
    # The command starts a grandchild that would outlive a plain kill of its parent.
    script = (
        "import subprocess, sys, time;"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
        "print(p.pid, flush=True); time.sleep(600)"
    )
    marker = f"burrow-sandbox-test-{secrets.token_hex(4)}"
    sb = burrow.Sandbox.create(PY, "-c", script, marker, client=relay.client())
    first = next(iter(sb.stdout))
    assert first.strip().isdigit()
    assert _processes_with(marker)
    sb.terminate()
    wait_until(lambda: not _processes_with(marker), "the sandbox's processes to go")


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline and int(entry.name) != os.getpid():
                found.append(int(entry.name))
    return found


def test_create_from_a_thread_that_ends(relay: RelayHarness) -> None:
    # Parent-death signals follow the thread that forks; sandboxes are started
    # from the agent's thread, so a request handler's thread may come and go.
    web = free_port()
    made: list[burrow.Sandbox] = []
    thread = threading.Thread(
        target=lambda: made.append(
            burrow.Sandbox.create(*_serve(web), encrypted_ports=[web], client=relay.client())
        )
    )
    thread.start()
    thread.join()
    sb = made[0]
    with sb:
        sb.wait_ready(web, timeout=30)
        assert sb.poll() is None
        assert _curl(relay, sb.tunnels()[web].url + "/", "--fail").returncode == 0
    assert sb.returncode == sandbox.EXIT_TERMINATED


async def test_async_api(relay: RelayHarness) -> None:
    web = free_port()
    sb = await burrow.Sandbox.create.aio(*_serve(web), encrypted_ports=[web], client=relay.client())
    async with sb:
        tunnels = await sb.tunnels.aio()
        await sb.wait_ready.aio(web, timeout=30, http_path="/")
        await tunnels[web].wait_ready.aio(timeout=5)
        assert sb.poll() is None
    assert sb.returncode == sandbox.EXIT_TERMINATED
    await sb.wait.aio(raise_on_termination=False)
    lines = [line async for line in sb.stderr]
    assert any("GET / HTTP/1.1" in line for line in lines)


def test_wait_ready_stops_when_the_sandbox_ends(relay: RelayHarness) -> None:
    web = free_port()
    sb = burrow.Sandbox.create(
        PY, "-c", "raise SystemExit(2)", encrypted_ports=[web], client=relay.client()
    )
    with pytest.raises(NotReadyError, match=r"ended \(exit code 2\)") as info:
        sb.wait_ready(web, timeout=120)
    assert info.value.port == web


# -- bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"encrypted_ports": [0]}, "not a port number"),
        ({"encrypted_ports": [70000]}, "not a port number"),
        ({"encrypted_ports": ["8000"]}, "not a port number"),
        ({"encrypted_ports": [True]}, "not a port number"),
        ({"encrypted_ports": 8000}, "should be a list"),
        ({"encrypted_ports": [8000], "h2_ports": [8000]}, "declared more than once"),
        ({"timeout": 0}, "timeout must be"),
        ({"timeout": -5}, "timeout must be"),
        ({"timeout": 10**9}, "timeout must be"),
        ({"env": {"A=B": "x"}}, "env must map"),
        ({"isolation": "docker"}, "isolation must be one of"),
        ({"inbound_cidr_allowlist": ["not-a-network"]}, "inbound_cidr_allowlist"),
        ({"workdir": "/nonexistent/burrow-dir"}, "not a directory"),
    ],
)
def test_bad_arguments_are_refused(
    relay: RelayHarness, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidError, match=message):
        burrow.Sandbox.create("true", client=relay.client(), **kwargs)  # type: ignore[arg-type]


def test_missing_or_unknown_commands_are_refused(relay: RelayHarness, tmp_path: Path) -> None:
    before = set(Path(tempfile.gettempdir()).glob("burrow-sb-*"))
    with pytest.raises(InvalidError, match="needs a command"):
        burrow.Sandbox.create(client=relay.client())
    with pytest.raises(InvalidError, match=r"'no-such-binary-burrow'.*no such executable"):
        burrow.Sandbox.create("no-such-binary-burrow", "--flag", client=relay.client())
    with pytest.raises(InvalidError, match="must be strings"):
        burrow.Sandbox.create("echo", 3, client=relay.client())  # type: ignore[arg-type]
    with pytest.raises(InvalidError, match="no such executable"):
        burrow.Sandbox.create("./missing.sh", workdir=tmp_path, client=relay.client())
    # The refused creations left no workdir behind.
    assert set(Path(tempfile.gettempdir()).glob("burrow-sb-*")) <= before


def test_without_relay_settings_it_says_what_to_set() -> None:
    with pytest.raises(InvalidError, match="BURROW_RELAY"):
        burrow.Sandbox.create("true")


def test_a_level_that_does_not_work_is_refused_when_required(
    relay: RelayHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(isolation._works, IsolationLevel.BWRAP, "bwrap failed here: no userns")
    with pytest.raises(InvalidError, match="'bwrap' does not work on this machine: bwrap failed"):
        burrow.Sandbox.create("true", isolation="bwrap", client=relay.client())
    # auto falls back to the next level that works.
    assert isolation.available_isolation() is not IsolationLevel.BWRAP


def test_sandbox_cannot_be_made_directly() -> None:
    with pytest.raises(InvalidError, match=r"Sandbox\.create"):
        burrow.Sandbox()


# -- the command line ---------------------------------------------------------------

_CLI_SERVER = """
import http.server, os, sys
print("greeting:", os.environ["GREETING"], flush=True)
http.server.test(HandlerClass=http.server.SimpleHTTPRequestHandler, port=int(sys.argv[1]),
                 bind="127.0.0.1")
"""


def test_cli_prints_urls_passes_output_and_ends_on_ctrl_c(tmp_path: Path) -> None:
    web, raw = free_port(), free_port()
    workdir = tmp_path / "work"
    workdir.mkdir()
    _for_the_sandbox(workdir)
    (workdir / "index.html").write_text("cli sandbox page")
    with dev_relay(tmp_path / "relay") as relay:
        proc = subprocess.Popen(
            [
                *BURROW, "sandbox", "-p", str(web), "--tcp-port", str(raw),
                "--workdir", str(workdir), "-e", "GREETING=hello", "--timeout", "120",
                "--", PY, "-c", _CLI_SERVER, str(web),
            ],
            env=relay.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            printed = sorted(proc.stdout.readline().strip() for _ in range(3))
            urls = {line.split(": ", 1)[1] for line in printed}
            assert len(urls) == 3, printed
            assert any(line.startswith(f"port {web}: https://") for line in printed), printed
            assert any(line.startswith(f"port {raw}: https://") for line in printed), printed
            assert f"port {raw}: tcp://r1.localhost:" in "\n".join(printed), printed
            assert proc.stdout.readline().strip() == "greeting: hello"
            url = next(
                line.split(": ", 1)[1] for line in printed if line.startswith(f"port {web}:")
            )
            wait_until(lambda: relay.curl(url + "/").stdout == "cli sandbox page", "the page", 30)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 128 + signal.SIGINT
            assert "no tunnel" in relay.curl(url + "/").stdout
            assert "isolation" in proc.stderr.read() if proc.stderr else False
        finally:
            stop(proc)


def test_cli_exit_codes(tmp_path: Path) -> None:
    with dev_relay(tmp_path / "relay") as relay:
        done = subprocess.run(
            [*BURROW, "sandbox", "--", PY, "-c", "print('hi'); raise SystemExit(3)"],
            env=relay.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 3, done.stderr
        assert done.stdout == "hi\n"
        late = subprocess.run(
            [*BURROW, "sandbox", "--timeout", "1", "--", PY, "-c", "import time; time.sleep(120)"],
            env=relay.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert late.returncode == sandbox.EXIT_TIMEOUT
        assert "ran past 1s" in late.stderr
        bad = subprocess.run(
            [*BURROW, "sandbox", "--", "no-such-binary-burrow"],
            env=relay.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 1 and "no such executable" in bad.stderr
        usage = subprocess.run(
            [*BURROW, "sandbox", "-p", "0", "--", "true"],
            env=relay.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert usage.returncode == 2 and "0 is not in the range" in usage.stderr


def test_a_program_that_exits_ends_its_sandboxes(relay: RelayHarness) -> None:
    web = free_port()
    code = (
        "import sys, burrow\n"
        "sb = burrow.Sandbox.create(sys.executable, '-c', 'import time; time.sleep(600)',"
        f" encrypted_ports=[{web}])\n"
        f"print(sb.workdir, sb.tunnels()[{web}].url, flush=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BURROW_")}
    out = subprocess.run(
        [PY, "-c", code], env={**env, **relay.env()}, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    workdir, url = out.stdout.split()
    assert not Path(workdir).exists()
    assert "no tunnel" in _curl(relay, url + "/").stdout
    # Nor is any of its processes left (they work in the workdir): a sandbox
    # ended just after it started once outlived its program under bubblewrap.
    wait_until(lambda: not _working_in(workdir), "the sandbox's processes to end", seconds=10)


def _working_in(directory: str) -> list[int]:
    """The processes whose working directory is ``directory`` or inside it, removed or not."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd").removesuffix(" (deleted)")
        except OSError:  # gone meanwhile, or not ours to look at
            continue
        if cwd == directory or cwd.startswith(directory + "/"):
            found.append(int(entry.name))
    return found
