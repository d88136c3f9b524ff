"""Tests for burrow.relay.quota: per-token counts and a token bucket, time passed in."""

from __future__ import annotations

from burrow.relay.quota import RateLimit, TokenQuotas


def test_rate_limit_allows_a_burst_then_the_rate() -> None:
    rate = RateLimit(rate=2, burst=3)
    assert [rate.allow(0.0) for _ in range(4)] == [True, True, True, False]
    assert rate.allow(0.49) is False
    assert rate.allow(0.5) is True  # one more after half a second at 2/s
    assert not rate.full(0.5)
    assert rate.full(2.0)


def test_a_rate_limit_refills_no_higher_than_its_burst() -> None:
    rate = RateLimit(rate=1, burst=2)
    assert rate.full(0.0)  # never used
    assert rate.allow(0.0)
    # An hour idle is worth the burst, not 3,600 events.
    assert [rate.allow(3600.0) for _ in range(3)] == [True, True, False]


def test_a_refused_event_is_not_counted() -> None:
    rate = RateLimit(rate=1, burst=1)
    assert rate.allow(0.0)
    assert not rate.allow(0.5)
    assert not rate.allow(0.9)
    assert rate.allow(1.0)  # the refusals at 0.5 and 0.9 cost nothing


def test_token_quotas_count_and_forget() -> None:
    quotas = TokenQuotas(max_tunnels=10, creations_per_second=1, creation_burst=1)
    quotas.add("t")
    quotas.add("t")
    assert quotas.holds("t") == 2
    quotas.remove("t")
    quotas.remove("t")
    assert quotas.holds("t") == 0 and "t" not in quotas.held
    assert quotas.may_create("t", 0.0) and not quotas.may_create("t", 0.5)
    assert quotas.may_create("u", 0.5)


def test_removing_more_than_was_added_never_goes_negative() -> None:
    quotas = TokenQuotas(max_tunnels=10, creations_per_second=1, creation_burst=1)
    quotas.remove("t")
    assert quotas.holds("t") == 0 and quotas.held == {}


def test_refilled_buckets_are_forgotten_when_there_are_many() -> None:
    # One bucket per token id ever seen would grow without end; buckets that
    # have refilled would allow the same as a new one, so they go.
    quotas = TokenQuotas(max_tunnels=10, creations_per_second=1, creation_burst=1)
    for i in range(1100):
        assert quotas.may_create(f"t{i}", 0.0)
    assert len(quotas._rates) == 1100
    assert quotas.may_create("late", 10.0)  # every earlier bucket has refilled by now
    assert set(quotas._rates) == {"late"}


def test_buckets_still_refilling_are_kept() -> None:
    quotas = TokenQuotas(max_tunnels=10, creations_per_second=0.001, creation_burst=1)
    for i in range(1100):
        quotas.may_create(f"t{i}", 0.0)
    quotas.may_create("late", 1.0)
    assert len(quotas._rates) == 1101
    assert not quotas.may_create("t0", 1.0)  # its bucket was not reset by the sweep


def test_names_taken_back_are_free_for_a_reconnect_or_two_then_rate_limited() -> None:
    quotas = TokenQuotas(max_tunnels=10, creations_per_second=1, creation_burst=2)
    # A token that may hold 3 tunnels takes them back twice at once...
    assert all(quotas.may_reclaim("t", 0.0, 3) for _ in range(6))
    # ...but not a seventh time, until the rate allows; its creations are apart.
    assert not quotas.may_reclaim("t", 0.0, 3)
    assert quotas.may_create("t", 0.0)
    assert quotas.may_reclaim("t", 1.0, 3)
    assert quotas.may_reclaim("u", 0.0, 3)
