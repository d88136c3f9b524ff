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
    _reclaims: dict[str, RateLimit] = field(default_factory=dict)

    def may_create(self, token_id: str, now: float) -> bool:
        """Count one tunnel creation for ``token_id`` if its rate allows it."""
        return self._bucket(self._rates, token_id, now, self.creation_burst).allow(now)

    def may_reclaim(self, token_id: str, now: float, limit: int) -> bool:
        """Count one name taken back with a claim if ``token_id``'s rate allows it.

        A reconnecting agent takes all its tunnels back at once, so the burst
        is twice the token's tunnel ``limit`` (a reconnect, and another soon
        after): only a token that closes and reopens its names in a loop is
        held to the creation rate.
        """
        burst = max(self.creation_burst, 2 * limit)
        return self._bucket(self._reclaims, token_id, now, burst).allow(now)

    def _bucket(
        self, buckets: dict[str, RateLimit], token_id: str, now: float, burst: int
    ) -> RateLimit:
        rate = buckets.get(token_id)
        if rate is None:
            if len(buckets) > 4 * len(self.held) + 1024:
                # Forget buckets that have refilled: they would allow the same.
                full = [k for k, r in buckets.items() if r.full(now)]
                for k in full:
                    del buckets[k]
            rate = buckets[token_id] = RateLimit(self.creations_per_second, burst)
        return rate

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
