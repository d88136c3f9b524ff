"""A network with distances for the tests: a namespace of their own, paths with a round trip.

    with netns.network() as net:                       # `ip netns add burrow-…`, lo up
        relay = net.popen([sys.executable, "-m", "burrow", "relay", ...])
        path = net.path(9441, to=8441, rtt_ms=20)        # 127.0.0.1:9441 -> :8441, 20 ms RTT
        sock = net.socket()                              # a socket of this process, inside
    # every process started inside is stopped and the namespace deleted, even on an error

Topology: one namespace per test network, holding nothing but its own
loopback (no other interface, no route): every process of the network
(relays, agents, visitors, the paths) runs inside it, started with ``ip
netns exec``, and binds and connects to 127.0.0.1 there, so no byte can
leave it and nothing it opens is seen by the host. Since the namespace is
new, its ports are all free and a test may choose them.

Distance is a property of the path: each "agent -> relay N" and "visitor ->
relay N" is a delaying forwarder (tests/netpath.py, a process inside the
namespace) listening on a port of its own in front of the relay's, with its
own round-trip time. The kernel here has no netem, so the delay is added in
user space; netpath.py says what it models (the handshake's round trip,
EOF and resets in order, the window and a link rate) and what it does not.
A relay ``rN.localhost`` is reached as ``rN.localhost:<its path's port>``:
the client maps ``*.localhost`` to loopback itself, and one dev CA signs
every relay's certificate (:func:`relay_certificates`), so no name needs DNS.

Making namespaces needs root (CAP_SYS_ADMIN) and iproute2's ``ip``:
:func:`unavailable` says why not, for ``pytest.skip``.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

NETPATH: Final = Path(__file__).resolve().parent / "netpath.py"
PREFIX: Final = "burrow-"
RUN_NETNS: Final = Path("/run/netns")
CLONE_NEWNET: Final = 0x40000000
# Seconds a process inside gets to end on SIGTERM before it is killed.
STOP_TIMEOUT: Final = 10.0


class NamespaceError(Exception):
    """A namespace could not be made or used (an ``ip`` command failed)."""


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise NamespaceError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


@functools.cache
def unavailable() -> str | None:
    """Why network namespaces cannot be made here (for ``pytest.skip``), or None."""
    if os.geteuid() != 0:
        return "needs root to make network namespaces (ip netns)"
    if shutil.which("ip") is None:
        return "needs iproute2's ip to make network namespaces (apt-get install iproute2)"
    try:
        with network():
            pass
    except NamespaceError as exc:
        return f"cannot make a network namespace here: {exc}"
    return None


@dataclass
class NetPath:
    """A running tests/netpath.py: ``port`` on the namespace's loopback leads to ``target``."""

    proc: subprocess.Popen[str]
    port: int
    target: int
    rtt_ms: float

    def _command(self, command: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if answer != "ok":
            raise NamespaceError(f"path :{self.port}: {command}: {answer or 'it has exited'}")

    def silent(self) -> None:
        """Stop forwarding and accepting without closing anything: the path drops everything."""
        self._command("silent")

    def flow(self) -> None:
        """Forward again after :meth:`silent`."""
        self._command("flow")

    def reset(self) -> None:
        """Reset every connection on the path, on both sides, now."""
        self._command("reset")


@dataclass
class Network:
    """A network namespace of the tests' own; see the module's docstring."""

    name: str
    processes: list[subprocess.Popen[Any]] = field(default_factory=list)

    def argv(self, command: Sequence[str]) -> list[str]:
        """``command`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *command]

    def popen(self, command: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``command`` inside the namespace; it is stopped when the network ends."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[Any] = subprocess.Popen(
            self.argv(command), start_new_session=True, **kwargs
        )
        self.processes.append(proc)
        return proc

    def run(self, command: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``command`` inside the namespace to its end (``subprocess.run``'s arguments)."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.argv(command), check=False, **kwargs)

    def stop(self, proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
        """``sig`` to one process started here, SIGKILL if it has not ended in time."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket of this process that lives inside the namespace.

        A socket belongs for good to the namespace of the thread that made
        it, so a short-lived thread enters the namespace (setns; Python 3.11
        has no os.setns) and makes it; any thread may then use it.
        """
        made: list[socket.socket | BaseException] = []

        def inside() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(RUN_NETNS / self.name, os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        errno = ctypes.get_errno()
                        raise OSError(errno, f"setns: {os.strerror(errno)}")
                finally:
                    os.close(fd)
                made.append(socket.socket(family, type))
            except BaseException as exc:
                made.append(exc)

        thread = threading.Thread(target=inside, name=f"setns-{self.name}")
        thread.start()
        thread.join()
        result = made[0]
        if isinstance(result, BaseException):
            raise NamespaceError(f"a socket in {self.name}: {result}") from result
        return result

    def path(
        self,
        port: int,
        *,
        to: int,
        rtt_ms: float,
        rate_mbit: float | None = None,
        window: int | None = None,
        log: IO[bytes] | None = None,
    ) -> NetPath:
        """A path with ``rtt_ms`` from 127.0.0.1:``port`` (0: any) to 127.0.0.1:``to``."""
        command = [sys.executable, str(NETPATH), "--listen", f"127.0.0.1:{port}"]
        command += ["--to", f"127.0.0.1:{to}", "--rtt-ms", f"{rtt_ms:g}"]
        if rate_mbit is not None:
            command += ["--rate-mbit", f"{rate_mbit:g}"]
        if window is not None:
            command += ["--window", str(window)]
        proc = self.popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        return _started_path(proc, to, rtt_ms)

    def pids(self) -> list[int]:
        """Every process inside the namespace."""
        return [int(pid) for pid in _ip("netns", "pids", self.name).split()]

    def inode(self) -> int:
        """The namespace's identity, as /proc/PID/ns/net shows it for a process inside."""
        return os.stat(RUN_NETNS / self.name).st_ino

    def listening(self) -> list[tuple[str, int]]:
        """The TCP and UDP addresses that something listens on inside the namespace."""
        out = self.run(["ss", "-Htlnu"], capture_output=True, text=True).stdout
        found = []
        for line in out.splitlines():
            local = line.split()[4]
            host, _, port = local.rpartition(":")
            found.append((host.strip("[]"), int(port)))
        return found

    def close(self) -> None:
        for proc in reversed(self.processes):
            self.stop(proc)
        # Anything left inside (a child a process left behind) can only be ours.
        with contextlib.suppress(NamespaceError):
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _started_path(proc: subprocess.Popen[str], to: int, rtt_ms: float) -> NetPath:
    assert proc.stdout is not None
    line = proc.stdout.readline()  # it prints this line once it listens, or exits
    if not line.startswith("listening "):
        proc.kill()
        raise NamespaceError(f"the path to :{to} did not start: {line!r}")
    return NetPath(proc, int(line.split()[1]), to, rtt_ms)


@contextlib.contextmanager
def network() -> Iterator[Network]:
    """A new namespace ``burrow-<random>`` with loopback up; deleted with all inside on exit."""
    name = PREFIX + secrets.token_hex(4)
    _ip("netns", "add", name)
    net = Network(name)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        yield net
    finally:
        try:
            net.close()
        finally:
            _ip("netns", "delete", name)


def relay_certificates(root: Path, domains: Sequence[str]) -> tuple[Path, list[Any]]:
    """One dev CA and a certificate for each of ``domains`` (and its wildcard), all signed by it.

    Returns the CA certificate and, for each domain, its
    :class:`burrow.net.devca.DevCertificates` (in ``root/<domain>``).
    """
    from burrow.net import devca

    made = []
    first: Path | None = None
    for domain in domains:
        where = root / domain
        if first is not None:
            # ensure_dev_certificates keeps a CA it finds: give each the first one's.
            where.mkdir(parents=True, exist_ok=True, mode=0o700)
            for name in (devca.CA_CERT_FILE, devca.CA_KEY_FILE):
                shutil.copy2(first / name, where / name)
        made.append(devca.ensure_dev_certificates(where, domain))
        first = first or where
    return made[0].ca_cert, made
