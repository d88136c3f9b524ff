"""``burrow dev`` as a process of its own, as users run it, for tests of whole workloads.

    with dev_relay(tmp_path) as relay:
        subprocess.run([...], env=relay.env())      # the workload finds the relay
        relay.curl(url)                             # a visitor that trusts the dev CA
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

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
