"""``burrow launch jupyter`` through a dev relay, with curl as the visitor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from devrelay import BURROW, DevRelay
from launchers import Launched, LaunchFactory


def _children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (Linux)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rpartition(")")[2].split()[0] == "Z"  # a zombie has ended too


def _get(relay: DevRelay, url: str, *args: str) -> tuple[int, str]:
    result = relay.curl(url, "-o", "-", "-w", "\n%{http_code}", *args)
    assert result.returncode == 0, result.stderr
    body, _, code = result.stdout.rpartition("\n")
    return int(code), body


def _stops_cleanly(jupyter: Launched, sig: signal.Signals) -> None:
    children = _children(jupyter.process.pid)
    assert children, "no Jupyter process under burrow launch"
    jupyter.process.send_signal(sig)
    assert jupyter.stop() == 0, jupyter.log()
    assert all(_gone(pid) for pid in children), jupyter.log()


def test_jupyterlab_answers_with_the_token_only(
    launch: LaunchFactory, relay: DevRelay, tmp_path: Path
) -> None:
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    (notebooks / "hello.txt").write_text("hi")
    with launch("jupyter", "--notebook-dir", str(notebooks)) as jupyter:
        assert jupyter.url.startswith("https://") and ".r1.localhost:" in jupyter.url
        token = jupyter.token
        assert len(token) >= 40

        # The token in a header, as API clients send it.
        status, body = _get(
            relay, jupyter.base + "/api/contents", "-H", f"Authorization: token {token}"
        )
        assert status == 200, body
        assert [item["name"] for item in json.loads(body)["content"]] == ["hello.txt"]
        # The token in the query, as the printed URL carries it.
        status, body = _get(relay, f"{jupyter.base}/api/status?token={token}")
        assert status == 200 and "started" in json.loads(body)
        status, body = _get(relay, jupyter.url.replace("/?", "/lab?"))
        assert status == 200 and "JupyterLab" in body

        # Without it, or with a wrong one: refused, or sent to the login page.
        assert _get(relay, jupyter.base + "/api/contents")[0] == 403
        assert _get(relay, jupyter.base + "/api/status?token=wrong")[0] == 403
        wrong = ("-H", "Authorization: token " + "x" * len(token))
        assert _get(relay, jupyter.base + "/api/contents", *wrong)[0] == 403
        status, _ = _get(relay, jupyter.base + "/lab")
        assert status == 302
        location = relay.curl(jupyter.base + "/lab", "-o", "/dev/null", "-w", "%{redirect_url}")
        assert "/login" in location.stdout

        _stops_cleanly(jupyter, signal.SIGINT)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_jupyter_server_behind_an_allowlist_stops_on_a_signal(
    launch: LaunchFactory, relay: DevRelay, sig: signal.Signals
) -> None:
    with launch("jupyter", "--app", "server", "--allow", "192.0.2.0/24") as jupyter:
        # curl comes from 127.0.0.1, outside the allowlist: the relay turns it away.
        status, _ = _get(relay, f"{jupyter.base}/api/status?token={jupyter.token}")
        assert status == 403
        _stops_cleanly(jupyter, sig)


def test_jupyter_that_fails_to_start_is_a_clear_error(relay: DevRelay) -> None:
    result = subprocess.run(
        [*BURROW, "launch", "jupyter", "--app", "server", "--", "--no-such-option=1"],
        env=relay.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert result.stdout == ""  # no URL was printed
    assert "Jupyter Server ended with exit code" in result.stderr
    assert "before it listened" in result.stderr


def test_missing_jupyter_names_the_extra(relay: DevRelay) -> None:
    # As if JupyterLab were not installed: the import system finds no module.
    hide = "import sys; sys.modules['jupyterlab'] = None; from burrow.cli import main; main()"
    result = subprocess.run(
        [sys.executable, "-c", hide, "launch", "jupyter"],
        env=relay.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "JupyterLab is not installed: pip install 'burrow[jupyter]'" in result.stderr
