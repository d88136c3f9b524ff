"""``burrow relay --config FILE`` and ``--check-config``, run as an operator runs them."""

from __future__ import annotations

import ctypes
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from backends import http_server
from devrelay import BURROW, clean_env

import burrow
from burrow import cli, configfile, tokens
from burrow.net import devca

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "docs" / "relay.example.toml"
DOMAIN = "r1.localhost"

# prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN): the kernel's own form of systemd's
# MemoryDenyWriteExecute=yes (Linux 6.3+), kept across fork and exec.
PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1
UNDER_MDWE = (
    "import ctypes, os, sys\n"
    f"assert ctypes.CDLL(None).prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
)


def kernel_has_mdwe() -> bool:
    return sys.platform == "linux" and ctypes.CDLL(None).prctl(PR_GET_MDWE, 0, 0, 0, 0) >= 0


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BURROW, "relay", *args],
        env=clean_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_the_example_file_is_valid_and_names_every_option() -> None:
    result = run("--config", str(EXAMPLE), "--check-config")
    assert result.returncode == 0, result.stderr
    shown = tomllib.loads(result.stdout)  # what --check-config prints is TOML too
    assert shown["domain"] == "r1.example.com"
    text = EXAMPLE.read_text()
    missing = [
        key
        for key in configfile.keys(cli.relay)
        if not re.search(rf"^#? ?{re.escape(key)} = ", text, re.MULTILINE)
    ]
    assert missing == [], f"add these keys, commented, to {EXAMPLE.relative_to(REPO)}"


def test_the_command_line_overrides_the_file(tmp_path: Path) -> None:
    (tmp_path / "relay.toml").write_text(
        'domain = "r1.example.com"\ncert = "fullchain.pem"\nkey = "privkey.pem"\n'
        'token-key = "/etc/burrow/token-public.pem"\nworkers = 2\nlisten = ["127.0.0.1:8443"]\n'
    )
    result = run("--config", "relay.toml", "--check-config", "--workers", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "workers = 3  # command line" in lines
    assert 'listen = ["127.0.0.1:8443"]  # relay.toml' in lines
    # Relative paths in the file are beside the file, wherever the relay starts.
    assert f'cert = "{tmp_path}/fullchain.pem"  # relay.toml' in lines
    assert "drain-timeout = 20.0  # default" in lines


def test_wrong_keys_and_values_are_named_with_their_lines(tmp_path: Path) -> None:
    (tmp_path / "relay.toml").write_text(
        'domain = "r1.example.com"\n# comment\ntoken_key = "k.pem"\n\n'
        'listen = "0.0.0.0:443"\nheartbeat = 0\n'
    )
    result = run("--config", "relay.toml", "--check-config", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "Error: 3 problems in relay.toml:",
        "  relay.toml, line 3: token_key: unknown key (did you mean token-key?)",
        '  relay.toml, line 5: listen: must be an array (listen = ["0.0.0.0:443"]), not a string',
        "  relay.toml, line 6: heartbeat: 0 is not in the range 1<=x<=3600.",
    ]


def test_check_config_fails_on_what_the_relay_would_refuse(tmp_path: Path) -> None:
    (tmp_path / "relay.toml").write_text(
        'domain = "not a name"\ncert = "c"\nkey = "k"\ntoken-key = "t"\n'
    )
    result = run("--config", "relay.toml", "--check-config", cwd=tmp_path)
    assert result.returncode == 1, result
    assert "not a name" in result.stderr and result.stdout == ""
    missing = run("--config", str(tmp_path / "nowhere.toml"), "--check-config")
    assert missing.returncode == 2 and "cannot read the config file" in missing.stderr
    without_domain = tmp_path / "partial.toml"
    without_domain.write_text('cert = "c"\nkey = "k"\ntoken-key = "t"\n')
    assert "--domain" in run("--config", str(without_domain), "--check-config").stderr


@pytest.mark.parametrize("mdwe", [False, True], ids=["plain", "memory-deny-write-execute"])
def test_a_relay_runs_from_a_config_file_and_drains_on_sigterm(tmp_path: Path, mdwe: bool) -> None:
    """The systemd unit's way: every setting from the file, state dir from the command line."""
    if mdwe and not kernel_has_mdwe():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    certs = devca.ensure_dev_certificates(tmp_path / "etc", DOMAIN)
    signing = tokens.generate_signing_key()
    tokens.write_public_key(signing, tmp_path / "etc" / "token-public.pem")
    port = free_port()
    config = tmp_path / "etc" / "relay.toml"
    config.write_text(
        f'domain = "{DOMAIN}"\n'
        f'cert = "{certs.cert.name}"\nkey = "{certs.key.name}"\n'
        'token-key = "token-public.pem"\n'
        f'listen = ["127.0.0.1:{port}"]\n'
        'tcp-ports = "40000-40100"\ndrain-timeout = 5\nlog-level = "info"\n'
    )
    prefix = [sys.executable, "-c", UNDER_MDWE] if mdwe else [sys.executable]
    args = [*prefix, "-m", "burrow", "relay", "--config", str(config)]
    args += ["--state-dir", str(tmp_path / "state")]
    log = tmp_path / "relay.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(args, env=clean_env(), stdin=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 30
        while f"listening on ('127.0.0.1', {port})" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        client = burrow.Client(
            relay=f"{DOMAIN}:{port}",
            token=tokens.mint(signing, subject="op", ttl_seconds=600),
            ca=str(certs.ca_cert),
        )
        with (
            http_server(files={"id": b"from-config\n"}) as server,
            burrow.forward(server.port, client=client) as tunnel,
        ):
            page = subprocess.run(
                ["curl", "-sS", "--fail", "--cacert", str(certs.ca_cert), tunnel.url + "/id"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert page.stdout == "from-config\n", page.stderr + log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "SIGTERM: draining for up to 5s" in log.read_text()
    assert "Traceback" not in log.read_text()
