"""BoundedLog: each kind of line a peer can cause comes at a bounded rate; time is passed in."""

from __future__ import annotations

import logging

import pytest

from burrow.relay.logs import BoundedLog


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def bounded(clock: Clock) -> BoundedLog:
    return BoundedLog(logging.getLogger("burrow.test.bounded"), rate=1.0, burst=3, clock=clock)


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "burrow.test.bounded"]


def test_a_burst_then_the_rate_then_a_count_of_what_was_left_out(
    bounded: BoundedLog, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="burrow.test.bounded")
    for n in range(10):
        bounded.warning("peer %s refused", n)
    assert lines(caplog) == ["peer 0 refused", "peer 1 refused", "peer 2 refused"]
    caplog.clear()
    clock.now = 1.0
    bounded.warning("peer %s refused", 10)
    assert lines(caplog) == ["peer 10 refused (and 7 more like it, not logged)"]
    caplog.clear()
    bounded.warning("peer %s refused", 11)  # the rate's one a second is spent
    clock.now = 2.0
    bounded.warning("peer %s refused", 12)
    assert lines(caplog) == ["peer 12 refused (and 1 more like it, not logged)"]


def test_each_kind_of_line_has_its_own_bound(
    bounded: BoundedLog, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="burrow.test.bounded")
    for n in range(5):
        bounded.warning("bad attach from %s", n)
    bounded.info("visitor %s left out by the allowlist", "a")
    assert lines(caplog)[-1] == "visitor a left out by the allowlist"
    assert len(lines(caplog)) == 4


def test_a_level_that_is_off_spends_nothing(
    bounded: BoundedLog, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="burrow.test.bounded")
    for n in range(10):
        bounded.info("peer %s", n)
    caplog.set_level(logging.INFO, logger="burrow.test.bounded")
    bounded.info("peer %s", "x")
    assert lines(caplog) == ["peer x"]


def test_a_line_is_reported_where_it_was_logged(
    bounded: BoundedLog, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="burrow.test.bounded")
    bounded.warning("here")
    bounded.log(logging.WARNING, "there")
    assert [r.funcName for r in caplog.records] == [
        "test_a_line_is_reported_where_it_was_logged"
    ] * 2
