"""Per-token quotas at a relay: how many tunnels a token holds, and how fast it opens them.

Sans-IO: time is passed in. A token is known by its id (the JWT ``jti``), so
every session of one token, in this relay process, shares its quota.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RateLimit:
    """A token bucket: ``rate`` events a second on average, bursts of up to ``burst``."""

    rate: float
    burst: float
    _tokens: float = field(init=False)
    _updated: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._tokens = self.burst

    def allow(self, now: float) -> bool:
        """Whether one more event may happen at ``now`` (and count it if so)."""
        if self._updated is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    def full(self, now: float) -> bool:
        """Whether the bucket has refilled, so forgetting it changes nothing."""
        if self._updated is None:
            return True
        return self._tokens + (now - self._updated) * self.rate >= self.burst


@dataclass
class TokenQuotas:
    """Tunnels held and creation rate, per token id."""

    max_tunnels: int
    """Tunnels one token may hold at once across its sessions."""
    creations_per_second: float
    creation_burst: int
    held: dict[str, int] = field(default_factory=dict)
    _rates: dict[str, RateLimit] = field(default_factory=dict)

    def may_create(self, token_id: str, now: float) -> bool:
        """Count one tunnel creation for ``token_id`` if its rate allows it."""
        rate = self._rates.get(token_id)
        if rate is None:
            if len(self._rates) > 4 * len(self.held) + 1024:
                # Forget buckets that have refilled: they would allow the same.
                self._rates = {k: r for k, r in self._rates.items() if not r.full(now)}
            rate = self._rates[token_id] = RateLimit(self.creations_per_second, self.creation_burst)
        return rate.allow(now)

    def holds(self, token_id: str) -> int:
        return self.held.get(token_id, 0)

    def add(self, token_id: str) -> None:
        self.held[token_id] = self.held.get(token_id, 0) + 1

    def remove(self, token_id: str) -> None:
        left = self.held.get(token_id, 0) - 1
        if left > 0:
            self.held[token_id] = left
        else:
            self.held.pop(token_id, None)
