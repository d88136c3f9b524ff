"""What ``import burrow`` brings in: the client, and none of the relay, JWT or the dev CA.

Checked in a fresh interpreter, after ``import burrow``, after building the
client's TLS contexts and settings, and after importing the command line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import burrow
from burrow.net.devca import ensure_dev_certificates

REPO = Path(__file__).resolve().parents[1]

# Modules the client must never load: the relay, its token checks (PyJWT and
# the cryptography it needs), the dev CA, the relay's ClientHello parser, and
# the relay's ACME client and DNS library (dnspython).
FORBIDDEN = (
    "burrow.relay",
    "burrow.tokens",
    "burrow.net.devca",
    "burrow.wire.clienthello",
    "jwt",
    "cryptography",
    "acme",
    "josepy",
    "dns",
)

PROBE = """
import importlib.util, json, sys
from pathlib import Path

def loaded():
    # A lazy module that has not run yet is not loaded.
    return sorted(
        name for name, module in sys.modules.items()
        if not isinstance(module, importlib.util._LazyModule)
    )

steps = {}
import burrow
steps["import burrow"] = loaded()
from burrow.agent.session import AgentSession
from burrow.net import tls
ca = Path(sys.argv[1])
tls.client_context(ca, ["http/1.1"])
tls.client_context(None, ["http/1.1"])
tls.shared_client_context(ca)
config = burrow.Client(relay="r1.localhost:1", token="t", ca=ca).config()
AgentSession(config)
steps["client contexts and settings"] = loaded()
import burrow.cli
steps["import burrow.cli"] = loaded()
print(json.dumps(steps))
"""


def forbidden(modules: list[str]) -> list[str]:
    return [m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]


@pytest.fixture(scope="module")
def steps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    ca = ensure_dev_certificates(tmp_path_factory.mktemp("state"), "r1.localhost").ca_cert
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(ca)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path_factory.getbasetemp())},
    )
    assert result.returncode == 0, result.stderr
    loaded: dict[str, list[str]] = json.loads(result.stdout)
    return loaded


@pytest.mark.parametrize("step", ["import burrow", "client contexts and settings"])
def test_the_client_loads_no_relay_jwt_or_dev_ca(steps: dict[str, list[str]], step: str) -> None:
    assert forbidden(steps[step]) == []
    assert "burrow.agent.client" in steps[step]


def test_importing_the_client_does_not_load_sandboxes_or_click(
    steps: dict[str, list[str]],
) -> None:
    loaded = steps["import burrow"]
    assert not [m for m in loaded if m.startswith(("burrow.sandbox", "burrow.launch", "click"))]


def test_the_command_line_loads_the_relay_only_when_a_command_needs_it(
    steps: dict[str, list[str]],
) -> None:
    loaded = steps["import burrow.cli"]
    assert "click" in loaded
    assert forbidden(loaded) == [m for m in loaded if m in ("burrow.relay", "burrow.relay.config")]


def test_the_public_names_are_unchanged() -> None:
    assert sorted(burrow.__all__) == [
        "Client",
        "Sandbox",
        "Tunnel",
        "__version__",
        "exception",
        "forward",
    ]
    from burrow.sandbox import Sandbox

    assert burrow.Sandbox is Sandbox
    namespace: dict[str, object] = {}
    exec("from burrow import *", namespace)
    assert set(burrow.__all__) <= set(namespace)
    with pytest.raises(AttributeError):
        burrow.NoSuchThing  # noqa: B018


def test_the_version_is_the_packages() -> None:
    from burrow._version import __version__

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert burrow.__version__ == __version__
    assert project.get("version", __version__) == __version__
