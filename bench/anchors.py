"""The setups compared: direct, ``ssh -R``, socat, and burrow's raw TCP and HTTPS tunnels.

Each setup is a context manager that starts what it needs in front of the
local servers and yields :class:`Setup` values: where a client connects for
iperf3, for HTTP, and for a fresh TLS connection, and which processes do
the tunnel's work (for CPU accounting).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from procs import HOST, free_port, running, wait_for, wait_port
from servers import TLS_NAME, Backends


@dataclass(frozen=True)
class Endpoint:
    """A base URL and the loopback port its TCP connections really go to."""

    url: str
    port: int
    ca: Path | None = None

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or HOST

    def curl_args(self) -> list[str]:
        args = ["--resolve", f"{self.host}:{self.port}:{HOST}"]
        if self.ca is not None:
            args += ["--cacert", str(self.ca)]
        return args

    def h2load_args(self) -> list[str]:
        return [f"--connect-to={HOST}:{self.port}"]


@dataclass(frozen=True)
class Setup:
    key: str
    label: str
    iperf_port: int | None
    """Where iperf3 reaches the iperf3 server; None if this setup cannot carry raw TCP."""
    http: Endpoint | None
    """nginx for downloads and request latency (plain HTTP, or HTTPS ended by the relay)."""
    tls: Endpoint | None
    """A fresh TLS connection through the setup, answered by nginx's ``/small``."""
    pids: tuple[int, ...] = ()
    """Processes (with their children) whose CPU time is the tunnel's cost."""
    procs: tuple[tuple[str, subprocess.Popen[bytes]], ...] = ()
    """The setup's long-running processes, by name, to notice one that has exited."""

    def gone(self) -> str | None:
        """Why this setup no longer works, if one of its processes has exited."""
        for name, proc in self.procs:
            if proc.poll() is not None:
                why = f"{name} (pid {proc.pid}) exited with {proc.returncode}"
                if proc.returncode in (0, -2, -15):
                    why += ", as on SIGTERM or SIGINT: stopped from outside this benchmark?"
                return why
        return None


def _tls_endpoint(port: int, ca: Path) -> Endpoint:
    return Endpoint(f"https://{TLS_NAME}:{port}", port, ca)


@contextlib.contextmanager
def direct(backends: Backends) -> Iterator[Setup]:
    yield Setup(
        key="direct",
        label="direct (no tunnel)",
        iperf_port=backends.iperf_port,
        http=Endpoint(f"http://{HOST}:{backends.http_port}", backends.http_port),
        tls=_tls_endpoint(backends.tls_port, backends.ca),
    )


def _forwarded(backends: Backends) -> list[int]:
    return [backends.iperf_port, backends.http_port, backends.tls_port]


def _relayed(
    key: str,
    label: str,
    ports: list[int],
    backends: Backends,
    procs: list[tuple[str, subprocess.Popen[bytes]]],
) -> Setup:
    iperf, http, tls = ports
    return Setup(
        key=key,
        label=label,
        iperf_port=iperf,
        http=Endpoint(f"http://{HOST}:{http}", http),
        tls=_tls_endpoint(tls, backends.ca),
        pids=tuple(proc.pid for _, proc in procs),
        procs=tuple(procs),
    )


# -- socat --------------------------------------------------------------------------


@contextlib.contextmanager
def socat(backends: Backends, tmp: Path) -> Iterator[Setup]:
    """One ``socat ... fork`` per port: a user-space relay with one hop.

    With ``nodelay`` on both sides, as a relay should: otherwise Nagle's
    algorithm holds back the second write of a TLS handshake flight.
    """
    ports: list[int] = []
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    with contextlib.ExitStack() as stack:
        for target in _forwarded(backends):
            port = free_port()
            log = tmp / f"socat-{target}.log"
            proc = stack.enter_context(
                running(
                    [
                        "socat",
                        f"TCP-LISTEN:{port},bind={HOST},reuseaddr,fork,backlog=4096,nodelay",
                        f"TCP:{HOST}:{target},nodelay",
                    ],
                    log,
                )
            )
            wait_port(port, proc, log, "socat")
            ports.append(port)
            procs.append(("socat", proc))
        yield _relayed("socat", "socat relay", ports, backends, procs)


# -- ssh -R -------------------------------------------------------------------------

SSHD = "/usr/sbin/sshd"


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "burrow-bench", "-f", str(path)],
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
    )


def _sshd_config(tmp: Path, port: int) -> Path:
    config = tmp / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                f"ListenAddress {HOST}",
                f"HostKey {tmp / 'host_key'}",
                f"PidFile {tmp / 'sshd.pid'}",
                f"AuthorizedKeysFile {tmp / 'authorized_keys'}",
                "PermitRootLogin prohibit-password",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                "AllowTcpForwarding yes",
                "GatewayPorts no",
                "X11Forwarding no",
                "PrintMotd no",
                "UseDNS no",
                "LogLevel ERROR",
                "",
            ]
        )
    )
    return config


@dataclass(frozen=True)
class Sshd:
    """A running sshd on loopback and the client key it accepts."""

    port: int
    client_key: Path
    proc: subprocess.Popen[bytes]

    def reverse_argv(self, forwards: list[tuple[int, int]]) -> list[str]:
        """``ssh -N -R`` forwarding each (remote port, local port) pair through this sshd."""
        spec: list[str] = []
        for port, target in forwards:
            spec += ["-R", f"{HOST}:{port}:{HOST}:{target}"]
        return [
            "ssh",
            "-N",
            "-i",
            str(self.client_key),
            "-p",
            str(self.port),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "LogLevel=ERROR",
            *spec,
            f"{getpass.getuser()}@{HOST}",
        ]


@contextlib.contextmanager
def sshd(tmp: Path) -> Iterator[Sshd]:
    """Debian's sshd on loopback, with fresh host and client keys."""
    tmp.mkdir(parents=True, exist_ok=True)
    _keygen(tmp / "host_key")
    _keygen(tmp / "client_key")
    (tmp / "authorized_keys").write_bytes((tmp / "client_key.pub").read_bytes())
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    sshd_port = free_port()
    config = _sshd_config(tmp, sshd_port)
    sshd_log = tmp / "sshd.log"
    with running([SSHD, "-D", "-e", "-f", str(config)], sshd_log) as proc:
        wait_port(sshd_port, proc, sshd_log, "sshd")
        yield Sshd(sshd_port, tmp / "client_key", proc)


@contextlib.contextmanager
def ssh_reverse(backends: Backends, tmp: Path) -> Iterator[Setup]:
    """Debian's sshd on loopback, and ``ssh -N -R`` forwarding each port through it."""
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(sshd(tmp))
        ports = [free_port() for _ in _forwarded(backends)]
        ssh_log = tmp / "ssh.log"
        argv = server.reverse_argv(list(zip(ports, _forwarded(backends), strict=True)))
        ssh = stack.enter_context(running(argv, ssh_log))
        for port in ports:
            wait_port(port, ssh, ssh_log, "ssh -R")
        yield _relayed("ssh", "ssh -R", ports, backends, [("sshd", server.proc), ("ssh -R", ssh)])


# -- burrow -------------------------------------------------------------------------


def _burrow(*args: str) -> list[str]:
    return [sys.executable, "-m", "burrow", *args]


def plain_link_option() -> str | None:
    """The relay's option for a plaintext agent link, if this burrow offers one."""
    try:
        text = subprocess.run(
            _burrow("dev", "--help"), capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return "--plain-data" if "--plain-data" in text else None


def _read_env(path: Path) -> dict[str, str]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in lines if "=" in line)


@contextlib.contextmanager
def burrow(
    backends: Backends,
    tmp: Path,
    state_dir: Path,
    plain_link: str | None = None,
    workers: int = 1,
) -> Iterator[tuple[Setup, Setup]]:
    """``burrow dev`` on a free loopback port and one ``burrow forward --tcp`` per port.

    Yields the raw TCP setup and the HTTPS setup, which share the relay and
    agents. ``plain_link`` is the relay's option for a plaintext agent link;
    ``workers`` its number of worker processes.
    """
    relay_args = [plain_link] if plain_link else []
    key = "burrow-plain" if plain_link else "burrow"
    label = "burrow plain link†" if plain_link else "burrow"
    if workers > 1:
        relay_args += ["--workers", str(workers)]
        key += f"-w{workers}"
        label += f", {workers} workers"
    tmp.mkdir(parents=True, exist_ok=True)
    env_file = tmp / "env"
    with contextlib.ExitStack() as stack:
        relay_log = tmp / "relay.log"
        relay = stack.enter_context(
            running(
                _burrow(
                    "dev",
                    "--port",
                    "0",
                    "--state-dir",
                    str(state_dir),
                    "--env-file",
                    str(env_file),
                    "--log-level",
                    "warning",
                    *relay_args,
                ),
                relay_log,
            )
        )
        wait_for(lambda: "BURROW_RELAY" in _read_env(env_file), relay, relay_log, "burrow dev")
        # The forwards find the dev relay through its state dir, not through these.
        agent_env = {"BURROW_STATE_DIR": str(state_dir), "BURROW_RELAY": "", "BURROW_TOKEN": ""}
        agents: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
        for target in _forwarded(backends):
            out, log = tmp / f"forward-{target}.out", tmp / f"forward-{target}.log"
            proc = stack.enter_context(
                running(_burrow("forward", str(target), "--tcp"), log, env=agent_env, stdout=out)
            )
            agents.append((proc, out, log))
        published: list[tuple[str, int]] = []
        for proc, out, log in agents:
            lines: list[str] = []

            def ready(out: Path = out, lines: list[str] = lines) -> bool:
                lines[:] = out.read_text().splitlines() if out.exists() else []
                return len(lines) >= 2

            wait_for(ready, proc, log, "burrow forward")
            url, tcp = lines[0].strip(), lines[1].strip()
            published.append((url, int(tcp.rsplit(":", 1)[1])))
        relay_port = int(_read_env(env_file)["BURROW_RELAY"].rsplit(":", 1)[1])
        tcp_ports = [tcp for _, tcp in published]
        for port in tcp_ports:
            wait_port(port, relay, relay_log, "burrow relay's TCP port")
        procs = [("burrow relay", relay), *(("burrow forward", proc) for proc, _, _ in agents)]
        raw = _relayed(f"{key}-tcp", f"{label} raw TCP", tcp_ports, backends, procs)
        https_url = published[1][0]
        https_endpoint = Endpoint(https_url, relay_port, state_dir / "ca.pem")
        https = Setup(
            key=f"{key}-https",
            label=f"{label} HTTPS",
            iperf_port=None,
            http=https_endpoint,
            tls=https_endpoint,
            pids=(relay.pid, agents[1][0].pid),
            procs=tuple(procs),
        )
        yield raw, https


@contextlib.contextmanager
def spread_tunnels(
    backends: Backends, tmp: Path, state_dir: Path, workers: int, per_worker: int = 2
) -> Iterator[list[Endpoint]]:
    """HTTPS tunnels to nginx, each from its own agent, until every worker owns ``per_worker``.

    A tunnel is served by the worker that owns its label, so a busy relay
    is busy across workers only when it carries many tunnels: this makes
    them, one ``burrow forward`` process (one session) each.
    """
    from burrow.wire import names

    env_file = state_dir / "env"
    relay_port = int(_read_env(env_file)["BURROW_RELAY"].rsplit(":", 1)[1])
    agent_env = {"BURROW_STATE_DIR": str(state_dir), "BURROW_RELAY": "", "BURROW_TOKEN": ""}
    owned: dict[int, list[Endpoint]] = {i: [] for i in range(workers)}
    tmp.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        for n in range(8 * workers * per_worker):
            if all(len(found) >= per_worker for found in owned.values()):
                break
            out, log = tmp / f"spread-{n}.out", tmp / f"spread-{n}.log"
            proc = stack.enter_context(
                running(_burrow("forward", str(backends.http_port)), log, env=agent_env, stdout=out)
            )
            wait_for(lambda out=out: out.exists() and bool(out.read_text()), proc, log, "forward")
            url = out.read_text().splitlines()[0].strip()
            label = urlsplit(url).hostname.split(".", 1)[0]  # type: ignore[union-attr]
            owned[names.worker_of(label, workers)].append(
                Endpoint(url, relay_port, state_dir / "ca.pem")
            )
        yield [e for found in owned.values() for e in found[:per_worker]]
