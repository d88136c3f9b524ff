"""contrib/systemd/burrow-relay.service: systemd accepts it, and burrow accepts its command.

``systemd-analyze verify`` needs no running systemd: it loads the unit file
as the manager would and reports every unknown key, bad value and missing
executable, so it runs in a container as well. It returns 0 for a key it
does not know (a warning), so any output at all fails the test. The unit's
ExecStart names /usr/local/bin/burrow; the test points it at this
environment's burrow, which must exist for verify to pass.
"""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from devrelay import clean_env

from burrow.relay.config import DRAIN_TIMEOUT

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "contrib" / "systemd" / "burrow-relay.service"
INSTALLED = "/usr/local/bin/burrow"

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze missing (scripts/test installs systemd)"
)


def burrow_executable() -> str:
    beside = Path(sys.executable).with_name("burrow")  # the virtualenv's console script
    found = str(beside) if beside.exists() else shutil.which("burrow")
    assert found, "burrow is not installed as a command (pip install -e .)"
    return found


def service() -> dict[str, list[str]]:
    """The [Service] section: each key with all its values (systemd keys repeat)."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    path = tmp_path / UNIT.name
    path.write_text(unit_text)
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert text.count(INSTALLED) == 1
    result = verify(text.replace(INSTALLED, burrow_executable()), tmp_path)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@needs_systemd_analyze
def test_systemd_analyze_verify_would_see_a_mistake(tmp_path: Path) -> None:
    """The check above is not vacuous: a misspelt key and a missing binary are reported."""
    text = UNIT.read_text().replace(INSTALLED, burrow_executable())
    misspelt = verify(text.replace("KillMode=", "KilMode="), tmp_path)
    assert "Unknown key 'KilMode'" in misspelt.stderr
    missing = verify(text.replace(burrow_executable(), str(tmp_path / "no-burrow")), tmp_path)
    assert missing.returncode != 0 and "no-burrow" in missing.stderr


def test_burrow_accepts_the_units_command_line(tmp_path: Path) -> None:
    [exec_start] = service()["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[:2] == [INSTALLED, "relay"]
    config = tmp_path / "relay.toml"
    config.write_text('domain = "r1.example.com"\ncert = "c"\nkey = "k"\ntoken-key = "t"\n')
    args = [
        str(config) if arg == "/etc/burrow/relay.toml" else arg.replace("${STATE_DIRECTORY}", "S")
        for arg in argv[2:]
    ]
    assert "--state-dir" in args and "--config" in args
    result = subprocess.run(
        [burrow_executable(), "relay", *args, "--check-config"],
        env=clean_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert 'state-dir = "S"  # command line' in result.stdout.splitlines()


def test_the_unit_drains_binds_low_ports_and_is_confined() -> None:
    unit = service()
    one = {key: values[-1] for key, values in unit.items()}
    assert float(one["TimeoutStopSec"].removesuffix("s")) > DRAIN_TIMEOUT
    assert one["KillSignal"] == "SIGTERM"
    assert one["KillMode"] == "mixed"  # workers get SIGTERM once, from the relay
    assert one["AmbientCapabilities"] == one["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert one["DynamicUser"] == "yes" and one["StateDirectory"] == "burrow"
    assert int(one["LimitNOFILE"]) >= 65536
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "MemoryDenyWriteExecute",
    ):
        assert one[key] == "yes", key
    assert one["ProtectSystem"] == "strict"
    assert one["RestrictAddressFamilies"].split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert unit["SystemCallFilter"][0] == "@system-service"
    assert "PrivateUsers" not in one  # it would keep the capability from the host's ports
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string(UNIT.read_text())
    assert parser["Install"]["WantedBy"] == "multi-user.target"
