"""Tests for burrow.net.loopthread: one event loop on one daemon thread, for code not async."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import threading
from collections.abc import Iterator

import pytest

from burrow.net.loopthread import LoopThread


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread("burrow-test-loop")
    yield thread
    thread.stop(timeout=10)


async def _where() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    return asyncio.get_running_loop(), threading.current_thread()


def test_nothing_starts_before_first_use(loop_thread: LoopThread) -> None:
    assert loop_thread.thread is None
    assert not loop_thread.in_loop_thread()
    loop_thread.stop()  # stopping what never started is harmless
    assert loop_thread.thread is None


def test_the_loop_runs_on_its_own_daemon_thread(loop_thread: LoopThread) -> None:
    loop = loop_thread.loop
    thread = loop_thread.thread
    assert thread is not None and thread.is_alive() and thread.daemon
    assert thread.name == "burrow-test-loop"
    assert thread is not threading.current_thread()
    assert loop.is_running()
    assert loop_thread.loop is loop, "a second use starts nothing new"
    assert loop_thread.run(_where(), timeout=10) == (loop, thread)


def test_run_returns_the_result_and_raises_the_error(loop_thread: LoopThread) -> None:
    async def double(n: int) -> int:
        await asyncio.sleep(0)
        return 2 * n

    async def fail() -> None:
        raise KeyError("nope")

    assert loop_thread.run(double(21), timeout=10) == 42
    with pytest.raises(KeyError, match="nope"):
        loop_thread.run(fail(), timeout=10)


def test_submit_hands_back_a_future(loop_thread: LoopThread) -> None:
    release = threading.Event()

    async def wait_for_release() -> str:
        await asyncio.get_running_loop().run_in_executor(None, release.wait)
        return "released"

    future = loop_thread.submit(wait_for_release())
    assert isinstance(future, concurrent.futures.Future)
    assert not future.done()
    release.set()
    assert future.result(timeout=10) == "released"


def test_run_from_the_loop_thread_raises(loop_thread: LoopThread) -> None:
    """A blocking call from the loop's own thread would wait forever: it raises instead."""
    inner = _where()

    async def nested() -> bool:
        assert loop_thread.in_loop_thread()
        with pytest.raises(RuntimeError, match="own thread"):
            loop_thread.run(inner)
        return True

    assert loop_thread.run(nested(), timeout=10)
    # The coroutine it was given is closed, not left to warn that it was never awaited.
    assert inspect.getcoroutinestate(inner) == inspect.CORO_CLOSED
    assert not loop_thread.in_loop_thread()


def test_stop_joins_the_thread_and_closes_the_loop(loop_thread: LoopThread) -> None:
    loop, thread = loop_thread.run(_where(), timeout=10)
    loop_thread.stop(timeout=10)
    assert not thread.is_alive()
    assert loop.is_closed()
    assert loop_thread.thread is None
    loop_thread.stop(timeout=10)  # twice is harmless


def test_use_after_stop_starts_a_fresh_loop(loop_thread: LoopThread) -> None:
    first_loop, first_thread = loop_thread.run(_where(), timeout=10)
    loop_thread.stop(timeout=10)
    second_loop, second_thread = loop_thread.run(_where(), timeout=10)
    assert second_loop is not first_loop and second_thread is not first_thread
    assert not second_loop.is_closed() and second_thread.is_alive()
    assert loop_thread.thread is second_thread


def test_threads_racing_to_first_use_share_one_loop(loop_thread: LoopThread) -> None:
    start = threading.Barrier(8)
    loops: list[asyncio.AbstractEventLoop] = []

    def use() -> None:
        start.wait(10)
        loops.append(loop_thread.loop)

    racers = [threading.Thread(target=use) for _ in range(8)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(10)
    assert len(loops) == 8
    assert all(loop is loops[0] for loop in loops)
    named = [t for t in threading.enumerate() if t.name == "burrow-test-loop"]
    assert named == [loop_thread.thread]
