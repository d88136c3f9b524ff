"""Log lines that anyone can cause, bounded.

The relay logs every refusal: a bad token, a bad attach, a visitor turned
away. Anyone who can reach the relay can cause one per connection, as fast
as the relay answers: unbounded, that fills the operator's disk and buries
the lines that matter. Each kind of line (its format string) may come
``burst`` times at once and ``rate`` times a second after that; the rest
are counted, and the next line of that kind that gets through says how
many were left out. The peer's answer is never affected, only the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

from burrow.relay.quota import RateLimit

# A few lines a second of each kind tell an operator what is happening; a
# burst of 20 shows the start of a flood in full.
REFUSAL_LINES_PER_SECOND: Final = 2.0
REFUSAL_LINES_BURST: Final = 20


class BoundedLog:
    """A logger's front for lines that peers cause, each kind rate-limited.

    The kinds are the format strings, which are constants in the code, so
    what it holds is bounded whatever peers do.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        rate: float = REFUSAL_LINES_PER_SECOND,
        burst: int = REFUSAL_LINES_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._limits: dict[str, RateLimit] = {}
        self._left_out: dict[str, int] = {}

    def log(self, level: int, msg: str, *args: object) -> None:
        self._log(level, msg, args, 3)

    def info(self, msg: str, *args: object) -> None:
        self._log(logging.INFO, msg, args, 3)

    def warning(self, msg: str, *args: object) -> None:
        self._log(logging.WARNING, msg, args, 3)

    def _log(self, level: int, msg: str, args: tuple[object, ...], stacklevel: int) -> None:
        # stacklevel: the line is reported as logged where the relay called us.
        if not self.logger.isEnabledFor(level):
            return
        limit = self._limits.get(msg)
        if limit is None:
            limit = self._limits[msg] = RateLimit(self._rate, self._burst)
        if not limit.allow(self._clock()):
            self._left_out[msg] = self._left_out.get(msg, 0) + 1
            return
        left_out = self._left_out.pop(msg, 0)
        if left_out:
            msg, args = msg + " (and %d more like it, not logged)", (*args, left_out)
        self.logger.log(level, msg, *args, stacklevel=stacklevel)
