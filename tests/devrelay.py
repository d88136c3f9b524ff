"""``burrow dev`` as a process of its own, as users run it, for tests of whole workloads.

with dev_relay(tmp_path) as relay:
    subprocess.run([...], env=relay.env())      # the workload finds the relay
    relay.curl(url)                             # a visitor that trusts the dev CA
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from harness import wait_until

import burrow
from burrow import tokens
from burrow.relay import dev

BURROW: Final = [sys.executable, "-m", "burrow"]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any BURROW_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BURROW_")}
    env.update(extra)
    return env


def stop(
    proc: subprocess.Popen[bytes] | subprocess.Popen[str],
    timeout: float = 15,
    sig: int = signal.SIGINT,
) -> None:
    """``sig`` (Ctrl-C's SIGINT unless told), then SIGKILL if it has not ended after
    ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class DevRelay:
    process: subprocess.Popen[bytes]
    state_dir: Path
    settings: dict[str, str]  # BURROW_RELAY, BURROW_TOKEN, BURROW_CA
    log: Path

    @property
    def ca(self) -> str:
        return self.settings["BURROW_CA"]

    @property
    def port(self) -> int:
        return int(self.settings["BURROW_RELAY"].rpartition(":")[2])

    def env(self, **extra: str) -> dict[str, str]:
        """An environment in which ``burrow.forward()`` and ``burrow`` commands use this relay."""
        return clean_env(BURROW_STATE_DIR=str(self.state_dir), **self.settings, **extra)

    def curl(self, url: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """``curl -sS --cacert CA ARGS URL``: a visitor of the tunnel (check the return code)."""
        return subprocess.run(
            ["curl", "-sS", "--cacert", self.ca, *args, url],
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@contextmanager
def dev_relay(tmp: Path, *args: str) -> Iterator[DevRelay]:
    """``burrow dev --port 0 ARGS`` with its state under ``tmp``; stopped on exit."""
    tmp.mkdir(parents=True, exist_ok=True)
    state, env_file, log = tmp / "dev-state", tmp / "dev.env", tmp / "relay.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [
                *BURROW,
                "dev",
                "--port",
                "0",
                "--state-dir",
                str(state),
                "--env-file",
                str(env_file),
                *args,
            ],
            env=clean_env(BURROW_STATE_DIR=str(state)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    try:
        deadline = time.monotonic() + 30
        while not (state / dev.PID_FILE).exists():
            if proc.poll() is not None:
                raise AssertionError(f"burrow dev ended: {log.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise AssertionError("burrow dev did not start in 30 s")
            time.sleep(0.05)
        yield DevRelay(proc, state, dev.parse_env(env_file.read_text()), log)
    finally:
        stop(proc)


# -- burrow dev with worker processes ------------------------------------------


def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


@dataclass
class DevWorkers:
    proc: subprocess.Popen[bytes]
    state: Path
    settings: dict[str, str]
    log: Path
    out: Path
    """What it printed: the relay's addresses, and with --metrics the listener's URL."""

    def client(self, subject: str) -> burrow.Client:
        key = tokens.read_signing_key(self.state / dev.SIGNING_KEY_FILE)
        token = tokens.mint(key, subject=subject, ttl_seconds=600)
        return burrow.Client(
            relay=self.settings["BURROW_RELAY"], token=token, ca=self.settings["BURROW_CA"]
        )

    def workers(self) -> list[int]:
        return children(self.proc.pid)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics_url(self) -> str:
        """The listener's URL, which it prints when started with ``--metrics``."""
        found = wait_until(
            lambda: re.search(r"dashboard on (http://\S+?)/?$", self.out.read_text(), re.M),
            "the metrics URL",
        )
        assert isinstance(found, re.Match)
        return found.group(1)


@contextmanager
def dev_workers(tmp_path: Path, count: int = 2, *options: str) -> Iterator[DevWorkers]:
    """``burrow dev --workers count`` (and ``options``), until its workers are up."""
    state, env_file, log = tmp_path / "state", tmp_path / "dev.env", tmp_path / "relay.log"
    out = tmp_path / "relay.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BURROW_")}
    args = [*BURROW, "dev", "--port", "0", "--workers", str(count), "--log-level", "debug"]
    args += ["--state-dir", str(state), "--env-file", str(env_file), *options]
    with log.open("wb") as err, out.open("wb") as printed:
        proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=printed, stderr=err)
    try:
        wait_until(lambda: env_file.exists() and len(children(proc.pid)) == count, "workers")
        yield DevWorkers(proc, state, dev.parse_env(env_file.read_text()), log, out)
    finally:
        stop(proc, sig=signal.SIGTERM)
