"""The ``BURROW_*`` environment and the dev relay's discovery file.

A workload finds its relay through these variables; ``burrow dev`` writes
the same settings to ``<state dir>/env`` with its pid beside them, and
:func:`running_dev_env` reads them back. Both sides import this module, so
it stays small: the client must not pay for the relay's imports.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Final

ENV_RELAY: Final = "BURROW_RELAY"
ENV_TOKEN: Final = "BURROW_TOKEN"
ENV_CA: Final = "BURROW_CA"
ENV_PLAIN_DATA: Final = "BURROW_PLAIN_DATA"
# Set by `burrow run` for every process of one workload: the relay lets a
# workload forward each port once, whichever of its processes asks.
ENV_WORKLOAD: Final = "BURROW_WORKLOAD"
ENV_STATE_DIR: Final = "BURROW_STATE_DIR"
# With several relays in BURROW_RELAY: how long a lost one has to come back
# before the agent moves its tunnels to another (burrow.agent.session).
ENV_FAILOVER_SECONDS: Final = "BURROW_FAILOVER_SECONDS"

# `burrow dev` listens on this port unless told otherwise; clients read the
# port it really has from its discovery file, in its state directory.
DEV_PORT: Final = 4443
ENV_FILE: Final = "env"
PID_FILE: Final = "relay.pid"


def default_state_dir() -> Path:
    """``$BURROW_STATE_DIR``, else ``$XDG_STATE_HOME/burrow/dev``, else ``~/.local/state/...``."""
    explicit = os.environ.get(ENV_STATE_DIR)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "burrow" / "dev"


def format_env(env: dict[str, str]) -> str:
    """Shell ``KEY=VALUE`` lines, quoted so that ``. file`` and ``--env-file`` both read them."""
    return "".join(f"{key}={shlex.quote(value)}\n" for key, value in env.items())


def parse_env(text: str) -> dict[str, str]:
    """Read back what :func:`format_env` wrote (also tolerates ``export KEY=...``)."""
    env: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        line = line.removeprefix("export ").strip()
        key, _, raw = line.partition("=")
        parts = shlex.split(raw) if raw else [""]
        env[key.strip()] = parts[0] if parts else ""
    return env


def running_dev_env(state_dir: Path | None = None) -> dict[str, str] | None:
    """The settings of a dev relay running on this machine, if there is one."""
    state_dir = state_dir or default_state_dir()
    try:
        pid = int((state_dir / PID_FILE).read_text().strip())
        text = (state_dir / ENV_FILE).read_text()
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, but someone else's
    return parse_env(text)
