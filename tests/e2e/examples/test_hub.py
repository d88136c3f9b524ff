"""examples/hub: an authenticated POST starts a user's notebook in a sandbox, 303 to its tunnel."""

from __future__ import annotations

import importlib.util
import json
import sys
import tomllib
from pathlib import Path

import pytest
from devrelay import DevRelay
from examplerun import EXAMPLES, Example, StartExample

ALICE = "alice-token-" + "a" * 20
BOB = "bob-token-" + "b" * 20
PYPROJECT = Path(__file__).resolve().parents[3] / "pyproject.toml"


def _require_jupyter() -> None:
    """The notebook test needs the ``jupyter`` extra; it must be installed once declared."""
    extras = tomllib.loads(PYPROJECT.read_text())["project"].get("optional-dependencies", {})
    if "jupyter" not in extras:
        pytest.skip("pyproject.toml declares no `jupyter` extra yet (pip install -e '.[jupyter]')")
    missing = [m for m in ("jupyter_server", "jupyterlab") if importlib.util.find_spec(m) is None]
    assert not missing, f"{missing} missing: pip install -e '.[jupyter]'"


@pytest.fixture
def hub(dev: DevRelay, start_example: StartExample, tmp_path: Path) -> tuple[Example, str]:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"# user:token\nalice:{ALICE}\nbob:{BOB}\n")
    example = start_example(
        [sys.executable, "hub.py"],
        env=dev.env(HUB_TOKENS_FILE=str(tokens), HUB_DATA=str(tmp_path / "data")),
        cwd=EXAMPLES / "hub",
    )
    url = example.wait_for_line(r"^hub: (https://\S+)$").group(1)
    return example, url


def _post(dev: DevRelay, url: str, *headers: str) -> tuple[int, dict[str, str]]:
    args = ["-X", "POST", "-o", "/dev/null", "-D", "-"]
    for header in headers:
        args += ["-H", header]
    result = dev.curl(url + "/start", *args, timeout=240)
    assert result.returncode == 0, result.stderr
    status_line, *lines = result.stdout.strip().splitlines()
    fields = {}
    for line in lines:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), fields


def test_no_or_a_wrong_credential_gets_401(dev: DevRelay, hub: tuple[Example, str]) -> None:
    _, url = hub
    assert _post(dev, url)[0] == 401
    assert _post(dev, url, "Authorization: Bearer wrong-token-wrong-token")[0] == 401
    assert _post(dev, url, f"Authorization: Basic {ALICE}")[0] == 401
    status, fields = _post(dev, url, f"Authorization: Bearer {ALICE}x")
    assert status == 401 and fields["www-authenticate"] == "Bearer"


def test_a_valid_token_gets_303_to_a_working_notebook(
    dev: DevRelay, hub: tuple[Example, str], tmp_path: Path
) -> None:
    _require_jupyter()
    example, url = hub
    status, fields = _post(dev, url, f"Authorization: Bearer {ALICE}")
    assert status == 303, example.stderr()
    location = fields["location"]
    assert location.startswith("https://") and ".r1.localhost:" in location
    notebook, _, query = location.partition("/lab?")
    assert query.startswith("token=")
    token = query.removeprefix("token=")

    # The Location answers through the notebook's own tunnel.
    page = dev.curl(location, "--fail", "-L", "-c", str(tmp_path / "jar"))
    assert page.returncode == 0, page.stderr
    assert "JupyterLab" in page.stdout
    api = dev.curl(f"{notebook}/api/contents?token={token}", "--fail")
    assert api.returncode == 0, api.stderr
    assert json.loads(api.stdout)["type"] == "directory"
    # The notebook's token is what lets a visitor in.
    denied = dev.curl(f"{notebook}/api/contents", "-o", "/dev/null", "-w", "%{http_code}")
    assert denied.stdout == "403"

    # Alice again: the same notebook; Bob: one of his own.
    again, again_fields = _post(dev, url, f"Authorization: Bearer {ALICE}")
    assert (again, again_fields["location"]) == (303, location)
    bob_status, bob_fields = _post(dev, url, f"Authorization: Bearer {BOB}")
    assert bob_status == 303 and bob_fields["location"].partition("/lab?")[0] != notebook
