"""Peer-supplied text made safe for a log line: escaped, and cut to a length.

An agent's name, a workload id, a claim, an error message: anything a peer
sends may hold line breaks or terminal escapes that would forge or garble
log lines. Every such string goes through :func:`loggable` on its way to a
log, on the relay and on the agent. Pure string work.
"""

from __future__ import annotations

from typing import Final

# Long enough for any honest agent name, address or error message; a peer
# that sends 64 KiB of "agent" gets one short line, not 64 KiB of log.
MAX_LOGGED: Final = 200

_ESCAPES: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape(char: str) -> str:
    if char.isprintable() and char != "\\":
        return char
    escaped = _ESCAPES.get(char)
    if escaped is not None:
        return escaped
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def loggable(value: object, limit: int = MAX_LOGGED) -> str:
    """``value`` (its ``str``) on one printable line of at most ``limit`` characters
    plus a note of how many were cut.

    Backslashes are escaped too, so an escape in the output always stands
    for the one character it names.
    """
    text = value if isinstance(value, str) else str(value)
    out: list[str] = []
    length = 0
    for index, char in enumerate(text):
        escaped = _escape(char)
        if length + len(escaped) > limit:
            return "".join(out) + f"...({len(text) - index} more)"
        out.append(escaped)
        length += len(escaped)
    return "".join(out)
