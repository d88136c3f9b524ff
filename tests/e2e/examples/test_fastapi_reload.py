"""examples/fastapi_reload: uvicorn --reload restarts the app, the tunnel's URL stays."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
from backends import free_port
from devrelay import BURROW, DevRelay
from examplerun import EXAMPLES, STARTUP_TIMEOUT, StartExample, fetch_when_up

OLD, NEW = "Hello from FastAPI", "Hello again, reloaded"


@pytest.mark.parametrize("under_run", [False, True], ids=["python", "burrow-run"])
def test_edit_reloads_the_app_behind_the_same_url(
    dev: DevRelay, start_example: StartExample, tmp_path: Path, under_run: bool
) -> None:
    # A copy, so the edit leaves examples/ alone.
    app_dir = tmp_path / "fastapi_reload"
    shutil.copytree(
        EXAMPLES / "fastapi_reload", app_dir, ignore=shutil.ignore_patterns("__pycache__")
    )
    command = [sys.executable, "serve.py"]
    # Under `burrow run` the reloader and its workers are one workload, which may
    # forward the port only once: the reloader's tunnel must not block the workers.
    server = start_example(
        [*BURROW, "run", "--", *command] if under_run else command,
        env=dev.env(PORT=str(free_port())),
        cwd=app_dir,
    )
    url = server.wait_for_line(r"Serving at (https://\S+)").group(1)
    assert json.loads(fetch_when_up(dev, url + "/", server)) == {"message": OLD}

    app = app_dir / "app.py"
    app.write_text(app.read_text().replace(OLD, NEW))

    # While the worker restarts, visitors may get an empty reply or the old app;
    # then the same URL must serve the new app.
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        body = dev.curl(url + "/", "--fail").stdout
        if body and json.loads(body) == {"message": NEW}:
            break
        assert time.monotonic() < deadline, (
            f"{url} still answers {body!r} after the edit; stderr:\n{server.stderr()}"
        )
        time.sleep(0.1)
    assert "Reloading" in server.stderr()  # uvicorn's reloader restarted the worker
    assert server.proc.poll() is None
    assert [line for line in server.lines if "Serving at" in line] == [f"Serving at {url}"]
