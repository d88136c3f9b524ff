"""burrow: publish a local port at an unguessable HTTPS address, through your own relay.

with burrow.forward(8000) as tunnel:
    print(tunnel.url)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from burrow.env import ENV_CA, ENV_RELAY
from burrow.net import tls

# A workload given its relay will reach it: its TLS context (the system's CAs,
# tens of milliseconds to parse, or its private CA) is made on another thread
# while the rest of burrow (asyncio and all) is imported, so that forward()
# finds it made. Imports below this line are the ones it overlaps.
if os.environ.get(ENV_RELAY):
    if os.environ.get(ENV_CA):
        tls.preload_pinned_trust(Path(os.environ[ENV_CA]))
    else:
        tls.preload_system_trust()

from burrow import exception
from burrow._version import __version__
from burrow.agent.client import Client, forward
from burrow.tunnel import Tunnel

if TYPE_CHECKING:
    from burrow.sandbox import Sandbox

__all__ = ["Client", "Sandbox", "Tunnel", "__version__", "exception", "forward"]


def __getattr__(name: str) -> Any:
    # Sandbox brings process management that forward() never needs: it is
    # imported on first use, so that `import burrow` stays cheap.
    if name == "Sandbox":
        from burrow.sandbox import Sandbox

        return Sandbox
    raise AttributeError(f"module 'burrow' has no attribute {name!r}")
