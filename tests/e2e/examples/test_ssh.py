"""examples/ssh: the OpenSSH client logs in through the raw TCP socket, host key pinned."""

from __future__ import annotations

import getpass
import subprocess
import sys
from pathlib import Path

import pytest
from backends import free_port
from devrelay import DevRelay
from examplerun import EXAMPLES, StartExample

from burrow.wire import names

SSH_TIMEOUT = 60.0


def _keygen(path: Path) -> Path:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=SSH_TIMEOUT,
    )
    return path


class Tunnel:
    """The example's sshd as the ssh client sees it, with a known_hosts file of our own."""

    def __init__(self, host: str, port: int, known_hosts: Path) -> None:
        self.host, self.port, self.known_hosts = host, port, known_hosts

    def ssh(self, key: Path, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "ssh",
                "-F",
                "/dev/null",  # none of the user's settings
                "-i",
                str(key),
                "-p",
                str(self.port),
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                f"UserKnownHostsFile={self.known_hosts}",
                "-o",
                "GlobalKnownHostsFile=/dev/null",
                # This machine's resolver may not map *.localhost to loopback (curl and
                # browsers do it themselves, ssh does not): dial the address, and check
                # the host key under the tunnel's name, as known_hosts lists it.
                "-o",
                f"HostKeyAlias=[{self.host}]:{self.port}",
                "-o",
                "ConnectTimeout=20",
                f"{getpass.getuser()}@{names.resolve_host(self.host)}",
                command,
            ],
            capture_output=True,
            text=True,
            timeout=SSH_TIMEOUT,
        )


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    """(the key the example lets in, another key)."""
    return _keygen(tmp_path / "allowed"), _keygen(tmp_path / "stranger")


@pytest.fixture
def tunnel(
    dev: DevRelay, start_example: StartExample, tmp_path: Path, keys: tuple[Path, Path]
) -> Tunnel:
    state, local_port = tmp_path / "sshd-state", free_port()
    sshd = start_example(
        [sys.executable, "sshd.py", str(keys[0]) + ".pub"],
        env=dev.env(PORT=str(local_port), SSHD_DIR=str(state)),
        cwd=EXAMPLES / "ssh",
    )
    match = sshd.wait_for_line(r"^ssh -p (\d+) (\S+)@(\S+)$")
    port, user, host = int(match.group(1)), match.group(2), match.group(3)
    assert (user, host) == (getpass.getuser(), "r1.localhost")
    # Pin the host key the example generated, read from its file, not from its output.
    key_type, key, *_ = (state / "ssh_host_ed25519_key.pub").read_text().split()
    entry = f"[{host}]:{port} {key_type} {key}"
    assert sshd.wait_for_line(r"^known_hosts line: ").string == f"known_hosts line: {entry}"
    # sshd may still be starting when the address is printed.
    sshd.wait_for_stderr(f"Server listening on 127.0.0.1 port {local_port}")
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(entry + "\n")
    return Tunnel(host, port, known_hosts)


def test_ssh_runs_a_command_through_the_tunnel(tunnel: Tunnel, keys: tuple[Path, Path]) -> None:
    result = tunnel.ssh(keys[0], "echo hello from $(whoami) over ssh")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"hello from {getpass.getuser()} over ssh\n"


def test_ssh_with_another_key_is_refused(tunnel: Tunnel, keys: tuple[Path, Path]) -> None:
    result = tunnel.ssh(keys[1], "echo should not run")
    assert result.returncode == 255
    assert result.stdout == ""
    assert "Permission denied (publickey)" in result.stderr


def test_ssh_refuses_a_host_key_it_does_not_know(
    tunnel: Tunnel, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    # known_hosts pinning another key for the tunnel's address: ssh must stop before logging in.
    other = _keygen(tmp_path / "other_host_key")
    key_type, key, *_ = Path(f"{other}.pub").read_text().split()
    tunnel.known_hosts.write_text(f"[{tunnel.host}]:{tunnel.port} {key_type} {key}\n")
    result = tunnel.ssh(keys[0], "echo should not run")
    assert result.returncode == 255
    assert result.stdout == ""
    assert "Host key verification failed" in result.stderr
