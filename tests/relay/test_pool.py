"""Tests for burrow.relay.pool: how many idle data connections a session keeps, in memory."""

from __future__ import annotations

import pytest

from burrow.relay.pool import MAX_DIAL_COUNT, MAX_RESERVE, Reserve, dial_counts

BASE = 4
HALF_LIFE = 30.0


def reserve() -> Reserve:
    return Reserve(BASE, half_life=HALF_LIFE)


def burst(pool: Reserve, visitors: int, now: float, *, pooled: int = BASE) -> None:
    """``visitors`` at ``now``: the first ``pooled`` find a connection, the rest wait
    for theirs (the agent dials them) and get them."""
    for _ in range(min(pooled, visitors)):
        pool.handed_out(now)
    for waiting in range(1, visitors - pooled + 1):
        pool.waited(now, waiting)
    for _ in range(visitors - pooled):
        pool.handed_out(now)


def test_a_new_session_keeps_the_pool_size() -> None:
    assert reserve().wanted(0.0) == BASE
    assert not reserve().raised(0.0)


def test_visitors_one_after_another_do_not_raise_it() -> None:
    pool = reserve()
    for i in range(1000):
        pool.handed_out(i * 0.001)  # 1,000 a second, none of them waiting
    assert pool.wanted(1.0) == BASE


def test_a_burst_that_waits_raises_it_to_the_burst() -> None:
    pool = reserve()
    burst(pool, 200, 10.0)
    assert pool.wanted(10.0) == 200
    assert pool.raised(10.0)


def test_visitors_handed_out_longer_ago_than_the_window_are_not_the_burst() -> None:
    pool = reserve()
    for i in range(100):
        pool.handed_out(i * 0.001)
    pool.waited(5.0, 1)
    assert pool.wanted(5.0) == BASE


def test_it_halves_every_half_life_back_to_the_pool_size() -> None:
    pool = reserve()
    burst(pool, 200, 0.0)
    assert pool.wanted(HALF_LIFE) == 100
    assert pool.wanted(2 * HALF_LIFE) == 50
    assert pool.wanted(10 * HALF_LIFE) == BASE
    assert not pool.raised(10 * HALF_LIFE)


def test_a_smaller_burst_while_it_is_raised_leaves_it() -> None:
    pool = reserve()
    burst(pool, 200, 0.0)
    burst(pool, 20, HALF_LIFE, pooled=0)
    assert pool.wanted(HALF_LIFE) == 100


def test_a_larger_burst_raises_it_again() -> None:
    pool = reserve()
    burst(pool, 100, 0.0)
    burst(pool, 150, 5.0, pooled=0)
    assert pool.wanted(5.0) == 150


@pytest.mark.parametrize("waiting", [MAX_RESERVE, 10_000])
def test_it_never_passes_its_cap(waiting: int) -> None:
    pool = reserve()
    for _ in range(waiting):
        pool.handed_out(1.0)
    pool.waited(1.0, waiting)
    assert pool.wanted(1.0) == MAX_RESERVE


def test_a_cap_below_the_pool_size_is_the_pool_size() -> None:
    assert Reserve(8, cap=2).wanted(0.0) == 8


@pytest.mark.parametrize(
    ("missing", "counts"),
    [
        (0, []),
        (-3, []),
        (1, [1]),
        (MAX_DIAL_COUNT, [MAX_DIAL_COUNT]),
        (MAX_DIAL_COUNT + 1, [MAX_DIAL_COUNT, 1]),
        (200, [64, 64, 64, 8]),
    ],
)
def test_dial_counts_ask_for_no_more_than_an_agent_dials_at_once(
    missing: int, counts: list[int]
) -> None:
    assert dial_counts(missing) == counts
    assert all(0 < count <= MAX_DIAL_COUNT for count in dial_counts(missing))
