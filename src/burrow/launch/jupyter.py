"""``burrow launch jupyter``: JupyterLab (or a plain Jupyter server) behind a tunnel.

Jupyter listens on a free loopback port and asks for a token that only the
printed URL carries; the tunnel publishes that port. Jupyter runs in a
process group of its own, so a Ctrl-C in the terminal reaches burrow alone,
and burrow stops Jupyter with SIGTERM (its clean shutdown: kernels too)
before it closes the tunnel.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from burrow.agent.client import Client, forward
from burrow.exception import InvalidError
from burrow.launch import StopFlag, free_loopback_port, new_token, require

APPS: Final = {
    # --app value: (module run with `python -m`, what to call it, what to pip install)
    "lab": ("jupyterlab", "JupyterLab", "burrow[jupyter]"),
    "notebook": ("notebook", "Jupyter Notebook", "notebook"),
    "server": ("jupyter_server", "Jupyter Server", "burrow[jupyter]"),
}

STOP_TIMEOUT: Final = 20.0
"""Seconds Jupyter gets to shut its kernels down after SIGTERM before SIGKILL."""

START_TIMEOUT: Final = 120.0
"""Seconds Jupyter may take to listen; a first JupyterLab start builds caches."""

POLL_INTERVAL: Final = 0.1
"""Seconds between checks of whether Jupyter listens yet (startup only)."""


@dataclass(frozen=True)
class JupyterOptions:
    """What ``burrow launch jupyter`` was asked for."""

    app: str = "lab"
    """The front end: ``lab`` (JupyterLab), ``notebook`` (Notebook 7), ``server`` (REST only)."""

    notebook_dir: Path | None = None
    """Directory Jupyter shows and saves in (``ServerApp.root_dir``); default: the current one."""

    allow: Sequence[str] | None = None
    """CIDRs visitors may come from (``inbound_cidr_allowlist``); ``None``: everyone."""

    extra_args: Sequence[str] = field(default_factory=tuple)
    """More command-line arguments for Jupyter, after burrow's own."""

    client: Client | None = None
    """Relay settings; ``None`` takes them from the environment or a running ``burrow dev``."""


def jupyter_argv(app: str, port: int, tunnel_host: str, options: JupyterOptions) -> list[str]:
    """The command that starts Jupyter on 127.0.0.1:``port`` for visitors of ``tunnel_host``."""
    module = APPS[app][0]
    argv = [
        sys.executable,
        "-m",
        module,
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        # Jupyter refuses a Host header it does not know (against DNS
        # rebinding); the tunnel's name is the one visitors send.
        "--ServerApp.local_hostnames=localhost",
        f"--ServerApp.local_hostnames={tunnel_host}",
    ]
    if os.geteuid() == 0:
        # Containers often run as root; Jupyter refuses that unless told.
        argv.append("--ServerApp.allow_root=True")
    if options.notebook_dir is not None:
        argv.append(f"--ServerApp.root_dir={options.notebook_dir}")
    argv.extend(options.extra_args)
    return argv


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _wait_until_listening(port: int, stop: StopFlag) -> bool:
    """Wait for Jupyter to listen (True), or for ``stop`` (False)."""
    waited = 0.0
    while not _listening(port):
        if stop.wait(POLL_INTERVAL):
            return False
        waited += POLL_INTERVAL
        if waited > START_TIMEOUT:
            raise InvalidError(f"Jupyter did not listen on port {port} in {START_TIMEOUT:g} s")
    return True


def stop_process(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def run_jupyter(options: JupyterOptions, echo: Callable[[str], None]) -> int:
    """Run Jupyter behind a tunnel until SIGINT, SIGTERM or SIGHUP, or until Jupyter ends.

    ``echo`` gets the URL (with the token) once Jupyter answers. Returns the
    exit code for the command: 0 after a signal, Jupyter's own if it ended
    by itself. Raises ``InvalidError`` if Jupyter is missing or fails to start.
    """
    if options.app not in APPS:
        raise InvalidError(f"unknown Jupyter app {options.app!r}: pick one of {', '.join(APPS)}")
    module, what, package = APPS[options.app]
    require(module, package, what)
    if options.notebook_dir is not None and not options.notebook_dir.is_dir():
        raise InvalidError(f"--notebook-dir {options.notebook_dir} is not a directory")

    token = new_token()
    port = free_loopback_port()
    with forward(port, inbound_cidr_allowlist=options.allow, client=options.client) as tunnel:
        stop = StopFlag()
        stop.install()
        env = {**os.environ, "JUPYTER_TOKEN": token}  # not in argv, where `ps` shows it
        proc = subprocess.Popen(
            jupyter_argv(options.app, port, tunnel.host, options),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sys.stderr.fileno(),  # our stdout carries only the URL
            start_new_session=True,  # Ctrl-C in the terminal reaches burrow, not Jupyter
        )

        # Jupyter ending by itself stops the launcher as a signal does.
        def watch() -> None:
            proc.wait()
            stop.set()

        threading.Thread(target=watch, name="burrow-jupyter-watch", daemon=True).start()
        try:
            listening = _wait_until_listening(port, stop)
            if listening:
                echo(f"{tunnel.url}/?token={token}")
                stop.wait()
            code = proc.poll()
            if code is None:
                return 0  # a signal: Jupyter is stopped below
            code = 128 - code if code < 0 else code
            if not listening:
                raise InvalidError(
                    f"{what} ended with exit code {code} before it listened "
                    "(see its messages above)"
                )
            print(f"burrow: {what} ended with exit code {code}", file=sys.stderr)
            return code
        finally:
            stop_process(proc)
