"""burrow's errors, grouped by what the caller can do about them.

Names follow Modal's ``modal.exception`` so that code written for
``modal.forward`` catches the same things here.

Every error says whether a retry can help: :attr:`Error.retryable` is true
when the same call, made again later with nothing changed, may succeed (the
relay was unreachable, or is restarting). Loops that retry (the agent's
connect and reconnect) read that attribute and nothing else.
"""

from __future__ import annotations


class Error(Exception):
    """Base class of every error burrow raises on purpose."""

    retryable: bool = False
    """Whether trying the same thing again later, unchanged, may succeed.

    False unless a subclass or the raiser says otherwise: a refused token, a
    bad argument or a relay's refusal stay what they are until someone
    changes something."""


class InvalidError(Error):
    """The caller asked for something that cannot be done (bad argument, missing settings)."""


class AuthError(Error):
    """The relay refused the agent's token: wrong, expired or revoked."""


class ConnectionError(Error):
    """The relay could not be reached, or the connection to it was lost.

    Retryable unless raised with ``retryable=False`` (a relay certificate we
    do not trust stays untrusted however often we dial)."""

    retryable = True

    def __init__(self, *args: object, retryable: bool = True) -> None:
        super().__init__(*args)
        self.retryable = retryable


class TimeoutError(Error):
    """An operation did not finish in the time allowed."""


class RelayError(Error):
    """The relay answered, but refused the request; ``code`` says why.

    ``retryable`` is set from the code by :func:`burrow.agent.errors.from_wire`
    (``shutting-down`` is; the others are not)."""

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable


class NotReadyError(TimeoutError):
    """The server behind a port did not accept connections in the time allowed.

    ``port`` is the local port, ``url`` the tunnel's address (if any),
    ``timeout`` the seconds waited and ``reason`` the last probe's failure.
    """

    def __init__(self, port: int, url: str | None, timeout: float, reason: str) -> None:
        where = f"Port {port} ({url})" if url else f"Port {port}"
        super().__init__(f"{where} was not ready within {timeout:g}s: {reason}")
        self.port = port
        self.url = url
        self.timeout = timeout
        self.reason = reason


class SandboxTimeoutError(TimeoutError):
    """A sandbox ran past its ``timeout`` and was killed, or its tunnels were not
    published in the time allowed (as Modal's error of the same name)."""


class SandboxTerminatedError(Error):
    """A sandbox was ended by ``terminate()`` (raised by ``wait()``, as in Modal)."""


class ProtocolError(Error):
    """Bytes on a burrow connection broke the wire protocol."""


class LocalProtocolError(ProtocolError):
    """This side tried to do something the protocol does not allow (a bug in burrow)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol: garbage, a frame too large, a bad message."""


__all__ = [
    "AuthError",
    "ConnectionError",
    "Error",
    "InvalidError",
    "LocalProtocolError",
    "NotReadyError",
    "ProtocolError",
    "RelayError",
    "RemoteProtocolError",
    "SandboxTerminatedError",
    "SandboxTimeoutError",
    "TimeoutError",
]
