"""Choosing a relay: the rule that keeps a home, what is remembered, and the race's order.

The race is driven with dials whose completion the test decides, so that
which one finishes first is a fact of the test, not of the machine's timing;
tests/e2e/test_fleet.py races real relays.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from burrow.agent import pick
from burrow.agent.pick import Memories, Memory, clearly_faster, decide, parse_relays
from burrow.exception import ConnectionError


def test_parse_relays_keeps_order_and_drops_repeats() -> None:
    assert parse_relays("a:1, b:2,a:1,,c") == ("a:1", "b:2", "c")
    assert parse_relays("") == ()


@pytest.mark.parametrize(
    ("home", "other", "expected"),
    [
        ([30, 30, 30], [10, 10, 10], True),  # 20 ms and two thirds
        ([30, 30, 30], [21, 21, 21], False),  # 9 ms: not enough
        ([100, 100, 100], [80, 80, 80], False),  # 20 ms but only a fifth faster
        ([100, 100, 100], [66, 66, 66], True),
        ([30, 30], [10, 10, 10], False),  # too few measurements of the home
        ([30, 30, 30], [10, 10], False),  # ... or of the other
        ([5, 5, 50], [1, 1, 1], False),  # medians: one slow handshake is not the home's speed
    ],
)
def test_clearly_faster(home: list[float], other: list[float], expected: bool) -> None:
    assert clearly_faster(home, other) is expected


def test_decide_keeps_the_home_unless_clearly_beaten() -> None:
    memory = Memory(home="h", rtt={"h": [9, 9, 9], "o": [5, 5, 5]})
    assert decide(memory, "o", home_connected=True) == "h"  # 4 ms faster: stay
    assert decide(memory, "o", home_connected=False) == "o"  # the home failed
    memory.rtt["o"] = [0.5, 0.5, 0.5]
    memory.rtt["h"] = [20, 20, 20]
    assert decide(memory, "o", home_connected=True) == "o"
    assert decide(Memory(), "o", home_connected=False) == "o"  # no home yet


def test_order_is_home_then_fastest_then_unmeasured() -> None:
    memory = Memory(home="c", rtt={"a": [30.0], "b": [10.0]})
    assert memory.ordered(["a", "b", "c", "d", "e"]) == ["c", "b", "a", "d", "e"]


def test_memory_keeps_the_last_samples() -> None:
    memory = Memory()
    for i in range(pick.SAMPLES_KEPT * 3):
        memory.measured("a", float(i))
    assert memory.rtt["a"] == [
        float(i) for i in range(pick.SAMPLES_KEPT * 2, pick.SAMPLES_KEPT * 3)
    ]


def test_memories_file_is_private_bounded_and_survives_garbage(tmp_path: Path) -> None:
    path = tmp_path / "agent" / "relays.json"
    memories = Memories(path)
    assert memories.load(["a", "b"]) == Memory()
    memories.save(["a", "b"], Memory(home="b", rtt={"a": [1.0], "b": [2.0]}))
    assert path.stat().st_mode & 0o777 == 0o600
    assert memories.load(["b", "a"]) == Memory(home="b", rtt={"a": [1.0], "b": [2.0]})
    # A home that is no longer a candidate is forgotten.
    memories.save(["x", "y"], Memory(home="gone", rtt={"x": [1.0]}))
    assert memories.load(["x", "y"]).home is None
    for n in range(pick.SETS_KEPT * 2):
        memories.save([f"r{n}", "s"], Memory(home="s"))
    assert len(json.loads(path.read_text())) == pick.SETS_KEPT
    for garbage in ("{", "[]", '{"a,b": 5}', '{"a,b": {"home": 7, "rtt": {"a": "x"}}}'):
        path.write_text(garbage)
        assert memories.load(["a", "b"]) == Memory()


# -- the race, with dials the test finishes in the order it wants ------------------


class Stream:
    """What a dial gives: closed at the end by whoever keeps it, or by the race."""

    def __init__(self, relay: str) -> None:
        self.relay = relay
        self.closed = False

    def close(self) -> None:
        self.closed = True


class Dials:
    def __init__(self) -> None:
        self.pending: dict[str, asyncio.Future[Stream]] = {}
        self.streams: dict[str, Stream] = {}

    async def dial(self, relay: str) -> Any:
        future: asyncio.Future[Stream] = asyncio.get_running_loop().create_future()
        self.pending[relay] = future
        return await future

    def finish(self, relay: str) -> Stream:
        stream = self.streams[relay] = Stream(relay)
        self.pending[relay].set_result(stream)
        return stream

    def fail(self, relay: str) -> None:
        self.pending[relay].set_exception(ConnectionError(f"{relay} is down"))


async def _started(dials: Dials, count: int) -> None:
    for _ in range(100):  # a few passes of the loop start every dial
        if len(dials.pending) >= count:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{len(dials.pending)} dials started, not {count}")


async def test_the_first_handshake_wins_and_the_rest_are_closed_when_they_finish() -> None:
    dials, memory = Dials(), Memory()
    kept: asyncio.Future[Memory] = asyncio.get_running_loop().create_future()
    race = asyncio.create_task(
        pick.race(["a", "b", "c", "d"], dials.dial, memory, keep=kept.set_result)
    )
    await _started(dials, 3)
    assert sorted(dials.pending) == ["a", "b", "c"]  # three at once, not four
    dials.finish("b")
    winner = await race
    assert winner.relay == "b" and winner.stream is dials.streams["b"]
    assert memory.home == "b"
    dials.finish("a")
    dials.fail("c")
    await kept
    assert dials.streams["a"].closed  # measured, then let go: no hello on it
    assert not dials.streams["b"].closed
    assert set(memory.rtt) == {"a", "b"}


async def test_the_home_is_waited_for_unless_clearly_beaten() -> None:
    dials = Dials()
    memory = Memory(home="h", rtt={"h": [20.0] * 3, "o": [15.0] * 3})
    race = asyncio.create_task(pick.race(["o", "h"], dials.dial, memory))
    await _started(dials, 2)
    dials.finish("o")
    await asyncio.sleep(0)
    assert not race.done()  # o is faster, but not clearly: the home's handshake decides
    dials.finish("h")
    assert (await race).relay == "h"
    assert dials.streams["o"].closed


async def test_a_home_that_fails_leaves_the_first() -> None:
    dials = Dials()
    memory = Memory(home="h", rtt={"h": [20.0] * 3, "o": [15.0] * 3})
    race = asyncio.create_task(pick.race(["o", "h"], dials.dial, memory))
    await _started(dials, 2)
    dials.finish("o")
    dials.fail("h")
    assert (await race).relay == "o"
    assert memory.home == "o"


async def test_no_relay_reachable_names_them_all() -> None:
    dials = Dials()
    race = asyncio.create_task(pick.race(["a", "b"], dials.dial, Memory()))
    await _started(dials, 2)
    dials.fail("a")
    dials.fail("b")
    with pytest.raises(ConnectionError, match="any burrow relay") as info:
        await race
    assert "a: a is down" in str(info.value) and "b: b is down" in str(info.value)
