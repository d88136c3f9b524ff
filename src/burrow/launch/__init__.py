"""Launchers: ready-made servers behind a tunnel (``burrow launch jupyter|shell``).

Each launcher starts its server on a free loopback port, guards it with a
token from ``secrets``, publishes the port with ``burrow.forward`` and prints
the URL with the token in it. The servers come from optional extras
(``burrow[jupyter]``, ``burrow[shell]``), imported only when a launcher runs.
"""

from __future__ import annotations

import importlib.util
import secrets
import socket
from typing import Final

from burrow.exception import InvalidError
from burrow.stop import STOP_SIGNALS, StopFlag

__all__ = [
    "DEFAULT_MAX_SHELLS",
    "STOP_SIGNALS",
    "TOKEN_BYTES",
    "StopFlag",
    "free_loopback_port",
    "new_token",
    "require",
]

TOKEN_BYTES: Final = 32
"""Random bytes in a launcher's token: 256 bits, far past guessing, like the label's 72."""

DEFAULT_MAX_SHELLS: Final = 8
"""Browser shells (tabs) open at once unless ``--max-shells`` says otherwise."""


def new_token() -> str:
    """A fresh URL-safe token for one launcher run."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def require(module: str, package: str, what: str) -> None:
    """Raise ``InvalidError`` naming the ``package`` to install when ``module`` is missing."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise InvalidError(f"{what} is not installed: pip install '{package}'")


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a server that binds by itself.

    Another process could take it before the server binds; the server then
    fails to start and the launcher says so.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
