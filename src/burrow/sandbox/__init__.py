"""``burrow.Sandbox``: a command run in isolation, its ports forwarded by this process's agent."""

from burrow.sandbox.core import (
    DEFAULT_TIMEOUT,
    EXIT_NOT_STARTED,
    EXIT_TERMINATED,
    EXIT_TIMEOUT,
    MAX_TIMEOUT,
    IsolationLevel,
    Sandbox,
    SandboxStream,
    available_isolation,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "EXIT_NOT_STARTED",
    "EXIT_TERMINATED",
    "EXIT_TIMEOUT",
    "MAX_TIMEOUT",
    "IsolationLevel",
    "Sandbox",
    "SandboxStream",
    "available_isolation",
]
