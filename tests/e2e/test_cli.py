"""The ``burrow`` command, run as users run it: real processes, real relay, real curl."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from backends import http_server
from devrelay import BURROW, clean_env, stop

from burrow.relay import dev


def _wait_for(
    predicate: Callable[[], object], what: str, proc: subprocess.Popen[str], seconds: float = 30
) -> object:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended before {what}: {out}\n{err}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def _process(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        stop(proc, timeout=10)


def test_dev_relay_writes_settings_and_forward_finds_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env_file = tmp_path / "dev.env"
    env = clean_env(BURROW_STATE_DIR=str(state))
    with _process([*BURROW, "dev", "--port", "0", "--env-file", str(env_file)], env) as relay:
        _wait_for(lambda: (state / dev.PID_FILE).exists(), "the dev relay", relay)
        settings = dev.parse_env(env_file.read_text())
        assert set(settings) == {"BURROW_RELAY", "BURROW_TOKEN", "BURROW_CA"}
        assert settings["BURROW_RELAY"].startswith("r1.localhost:")
        assert Path(settings["BURROW_CA"]) == state / "ca.pem"
        assert env_file.stat().st_mode & 0o077 == 0  # the token is a secret

        # No BURROW_* variables: `burrow forward` finds the running dev relay.
        with (
            http_server() as server,
            _process([*BURROW, "forward", str(server.port), "--tcp"], env) as forward,
        ):
            assert forward.stdout is not None
            url = forward.stdout.readline().strip()
            tcp = forward.stdout.readline().strip()
            assert url.startswith("https://") and ".r1.localhost:" in url
            assert tcp.startswith("tcp://r1.localhost:")
            page = subprocess.run(
                ["curl", "-sS", "--fail", "--cacert", settings["BURROW_CA"], url + "/"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
            assert server.marker in page.stdout
        # The state dir is reused: a second start keeps the same CA.
    ca_before = (state / "ca.pem").read_bytes()
    assert not (state / dev.PID_FILE).exists()
    dev.prepare(state, 0, (20000, 29999))
    assert (state / "ca.pem").read_bytes() == ca_before


def test_forward_without_any_relay_explains_what_to_set(tmp_path: Path) -> None:
    result = subprocess.run(
        [*BURROW, "forward", "8000"],
        env=clean_env(BURROW_STATE_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "InvalidError" in result.stderr
    assert "BURROW_RELAY" in result.stderr and "BURROW_TOKEN" in result.stderr


def test_token_keygen_mint_verify(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    subprocess.run(
        [*BURROW, "token", "keygen", "--out", str(keys)],
        check=True,
        timeout=30,
        capture_output=True,
    )
    assert (keys / "token-signing.pem").stat().st_mode & 0o077 == 0
    minted = subprocess.run(
        [
            *BURROW,
            "token",
            "mint",
            "--key",
            str(keys / "token-signing.pem"),
            "--subject",
            "alice",
            "--ttl",
            "1h",
            "--max-tunnels",
            "3",
        ],
        check=True,
        timeout=30,
        capture_output=True,
        text=True,
    )
    token = minted.stdout.strip()
    shown = subprocess.run(
        [*BURROW, "token", "verify", "--token-key", str(keys / "token-public.pem"), token],
        check=True,
        timeout=30,
        capture_output=True,
        text=True,
    )
    assert "subject: alice" in shown.stdout
    assert "max_tunnels: 3" in shown.stdout

    # Keygen refuses to overwrite a signing key that tokens may already depend on.
    again = subprocess.run(
        [*BURROW, "token", "keygen", "--out", str(keys)], timeout=30, capture_output=True, text=True
    )
    assert again.returncode != 0

    other = tmp_path / "other"
    subprocess.run(
        [*BURROW, "token", "keygen", "--out", str(other)],
        check=True,
        timeout=30,
        capture_output=True,
    )
    refused = subprocess.run(
        [*BURROW, "token", "verify", "--token-key", str(other / "token-public.pem"), token],
        timeout=30,
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0
    assert "which this relay does not hold" in refused.stderr  # another key's kid


@pytest.mark.parametrize("bad", ["abc", "0-10", "30000-20000", "1-70000"])
def test_relay_rejects_a_bad_tcp_range(bad: str) -> None:
    result = subprocess.run(
        [*BURROW, "dev", "--port", "0", "--tcp-ports", bad],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "port range" in result.stderr


def test_demo_fetches_its_page_through_the_tunnel() -> None:
    result = subprocess.run(
        [*BURROW, "demo"], env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "-> 200" in result.stdout
    assert "Hello from behind a burrow tunnel" in result.stdout
    assert "after the with block: GET -> 404" in result.stdout


_FIRST = """
import os, subprocess, sys
import burrow
port = int(sys.argv[1])
with burrow.forward(port) as tunnel:
    print("first:", tunnel.url, flush=True)
    for workload in (None, "another-workload"):
        env = dict(os.environ)
        if workload:
            env["BURROW_WORKLOAD"] = workload
        second = subprocess.run(
            [sys.executable, "-c", sys.argv[2], str(port)], env=env, capture_output=True, text=True
        )
        print(second.stdout + second.stderr, end="", flush=True)
"""
_SECOND = """
import sys
import burrow
try:
    with burrow.forward(int(sys.argv[1])) as tunnel:
        print("second:", tunnel.url)
except burrow.exception.InvalidError as exc:
    print("second refused:", exc)
"""


def test_run_makes_a_workload_whose_processes_forward_each_port_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = clean_env(BURROW_STATE_DIR=str(state))
    with _process([*BURROW, "dev", "--port", "0"], env) as relay, http_server() as server:
        _wait_for(lambda: (state / dev.PID_FILE).exists(), "the dev relay", relay)
        out = subprocess.run(
            [*BURROW, "run", "--", sys.executable, "-c", _FIRST, str(server.port), _SECOND],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].startswith("first: https://")
        # Another process of the same workload: refused, as inside one Modal container.
        assert lines[1] == f"second refused: Port {server.port} is already forwarded"
        # A process of another workload may forward the same port number.
        assert lines[2].startswith("second: https://") and lines[2][8:] != lines[0][7:]


def test_run_passes_the_exit_code_and_a_workload_id(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = clean_env(BURROW_STATE_DIR=str(state))
    with _process([*BURROW, "dev", "--port", "0"], env) as relay:
        _wait_for(lambda: (state / dev.PID_FILE).exists(), "the dev relay", relay)
        show = "import os; print(os.environ['BURROW_WORKLOAD'], os.environ['BURROW_RELAY'])"
        out = subprocess.run(
            [*BURROW, "run", "--", sys.executable, "-c", show + "; raise SystemExit(3)"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 3
        workload, relay_address = out.stdout.split()
        assert len(workload) >= 16 and relay_address.startswith("r1.localhost:")
    # Without a relay to run against, it says so instead of starting anything.
    out = subprocess.run(
        [*BURROW, "run", "--", "true"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0 and "BURROW_RELAY" in out.stderr
