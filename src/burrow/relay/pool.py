"""How many idle data connections a session keeps ready for its visitors.

Every visitor needs a data connection of its own, and one the agent has to
dial first costs the visitor a TCP and a TLS handshake with the agent (and a
round trip more to ask for it). A session starts with the relay's pool size.
When a visitor finds the pool empty, the reserve grows to what the burst has
taken: the connections handed out in the last second and the visitors
waiting, so that the next burst of that size finds its connections ready.
Visitors that come one after another (or leave at once) never find it empty,
so they do not grow it. When bursts stop, the reserve halves every half-life
back to the pool size. Pure policy: time is an argument.
"""

from __future__ import annotations

import collections
import math
from typing import Final

# Idle data connections one session may be asked to keep, whatever its
# demand. Each is a socket and about 50 KiB of TLS state here (and as much
# at the agent): 256 is some 13 MiB for a session that has just served a
# burst that large, and the reserve decays when it is over. A burst larger
# than this still gets every connection it waits for, dialled on demand.
MAX_RESERVE: Final = 256

# A burst is what was handed out within this many seconds: the visitors of
# one burst (a page's connections, a load test's ramp) arrive within it.
DEMAND_WINDOW: Final = 1.0

# With no new demand the reserve halves this often: a site visited in bursts
# every few seconds keeps its connections, a quiet one gives them back within
# a few minutes (a 256 reserve is back at a pool of four after six half-lives).
RESERVE_HALF_LIFE: Final = 30.0

# A reserve raised by a burst is refilled this long after a connection is
# handed out, and only once no visitor waits: on loopback a burst of 200 is
# served within about 50 ms, and the handshakes of its replacements would
# compete with it for the agent's CPU and the relay's. The pool's own size and
# the visitors waiting are asked for at once.
REFILL_DELAY: Final = 0.1

# One `dial` asks for at most this many data connections: agents dial at most
# 64 per message (agent/session.py), so a larger need goes in several.
MAX_DIAL_COUNT: Final = 64


class Reserve:
    """The number of idle data connections a session wants, from its recent bursts."""

    def __init__(
        self,
        base: int,
        *,
        cap: int = MAX_RESERVE,
        window: float = DEMAND_WINDOW,
        half_life: float | None = None,
    ) -> None:
        """``base``: the relay's pool size, the least ever wanted; ``cap``: the most."""
        self.base = base
        self.cap = max(base, cap)
        self.window = window
        self.half_life = RESERVE_HALF_LIFE if half_life is None else half_life
        # When each of the last connections handed out was; no more than the cap
        # is ever needed to count up to it.
        self._handed: collections.deque[float] = collections.deque(maxlen=self.cap)
        self._peak = float(base)
        self._peak_at = 0.0

    def handed_out(self, now: float) -> None:
        """A data connection went to a visitor at ``now``."""
        self._handed.append(now)

    def waited(self, now: float, waiting: int) -> None:
        """A visitor found the pool empty at ``now``; ``waiting`` visitors wait, it too."""
        while self._handed and self._handed[0] <= now - self.window:
            self._handed.popleft()
        burst = len(self._handed) + waiting
        if burst > self._decayed(now):
            self._peak, self._peak_at = float(min(burst, self.cap)), now

    def wanted(self, now: float) -> int:
        """Idle connections to keep at ``now``: between the base and the cap."""
        return max(self.base, min(self.cap, round(self._decayed(now))))

    def raised(self, now: float) -> bool:
        """Whether demand holds the reserve above the base at ``now``."""
        return self.wanted(now) > self.base

    def _decayed(self, now: float) -> float:
        elapsed = max(0.0, now - self._peak_at)
        return self._peak * math.exp(-math.log(2) * elapsed / self.half_life)


def dial_counts(missing: int) -> list[int]:
    """``missing`` data connections as the counts of the `dial` messages that ask for them."""
    full, rest = divmod(max(0, missing), MAX_DIAL_COUNT)
    return [MAX_DIAL_COUNT] * full + ([rest] if rest else [])
