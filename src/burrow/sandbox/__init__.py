"""``burrow.Sandbox``: a command run in isolation, its ports forwarded by this process's agent.

``core`` is the sandbox and its life, ``isolation`` the levels and the argv
of each, ``streams`` its output; ``cli`` is ``burrow sandbox``.
"""

from burrow.sandbox.core import (
    DEFAULT_TIMEOUT,
    EXIT_NOT_STARTED,
    EXIT_TERMINATED,
    EXIT_TIMEOUT,
    MAX_TIMEOUT,
    Sandbox,
)
from burrow.sandbox.isolation import Isolation, IsolationLevel, available_isolation
from burrow.sandbox.streams import SandboxStream

__all__ = [
    "DEFAULT_TIMEOUT",
    "EXIT_NOT_STARTED",
    "EXIT_TERMINATED",
    "EXIT_TIMEOUT",
    "MAX_TIMEOUT",
    "Isolation",
    "IsolationLevel",
    "Sandbox",
    "SandboxStream",
    "available_isolation",
]
