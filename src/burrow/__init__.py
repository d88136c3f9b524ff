"""burrow: publish a local port at an unguessable HTTPS address, through your own relay.

with burrow.forward(8000) as tunnel:
    print(tunnel.url)
"""

from __future__ import annotations

__version__ = "0.1.0"

from burrow import exception
from burrow.agent.client import Client, forward
from burrow.sandbox import Sandbox
from burrow.tunnel import Tunnel

__all__ = ["Client", "Sandbox", "Tunnel", "__version__", "exception", "forward"]
