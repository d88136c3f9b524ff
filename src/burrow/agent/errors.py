"""The relay's refusals as burrow exceptions: the one place where an ``error``
frame becomes something the caller can catch.

The table is in docs/protocol.md ("Error codes"); what a caller may retry is
in each exception's ``retryable`` (see :mod:`burrow.exception`).
"""

from __future__ import annotations

from typing import Final, Literal

from burrow.exception import AuthError, Error, InvalidError, RelayError
from burrow.wire import protocol
from burrow.wire.text import loggable

Stage = Literal["hello", "session", "open"]
"""What the error answers: our ``hello``, nothing (it ends a live session), an ``open``."""

# Codes for a state of the relay that passes by itself: a stopping relay is
# replaced, or comes back, and takes sessions again.
RETRYABLE_CODES: Final = frozenset({protocol.CODE_SHUTTING_DOWN})

# The relay's longest messages name a bad allowlist entry or a TCP range;
# a relay that sends more is cut short.
MAX_MESSAGE: Final = 1000


def from_wire(error: protocol.Error, relay: str, stage: Stage) -> Error:
    """The exception that ``error``, received from the relay at ``relay`` (its
    ``host:port``, for messages) in answer to ``stage``, stands for."""
    # Anyone's text, bound for exceptions and logs: one line, and not too long.
    code, message = loggable(error.code), loggable(error.message, MAX_MESSAGE)
    if code == protocol.CODE_AUTH and stage == "hello":
        return AuthError(f"the relay at {relay} refused the token: {message}")
    if code == protocol.CODE_AUTH and stage == "session":  # the token was revoked meanwhile
        return AuthError(f"the relay at {relay} ended the session: {message}")
    if code == protocol.CODE_TOKEN_EXPIRED:  # expired since hello: it ends the session
        if stage == "hello":
            return AuthError(f"the relay at {relay} refused the token: {message}")
        return AuthError(f"the relay at {relay} ended the session: {message}")
    if code == protocol.CODE_ENDED_BY_OPERATOR and stage == "session":
        return RelayError(code, f"the relay at {relay} ended the session: {message}")
    if code == protocol.CODE_FULL and stage == "hello":
        # Not retryable here: the same relay stays full; another relay of the list may not be.
        return RelayError(code, f"the relay at {relay} is full: {message}", retryable=False)
    if code == protocol.CODE_PORT_FORWARDED and stage == "open":
        return InvalidError(message)  # the relay's message is the one users know
    if stage == "open":
        message = f"the relay refused to open a tunnel: {message}"
    return RelayError(code, message, retryable=code in RETRYABLE_CODES)
