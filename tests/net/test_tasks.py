"""Tests for burrow.net.tasks: a TaskSet holds its tasks until they end, and cancels the rest."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from burrow.net.tasks import TaskSet


async def _forever() -> None:
    # A future only this coroutine knows: nothing but the task set keeps the task alive.
    await asyncio.get_running_loop().create_future()


async def test_spawn_runs_the_coroutine_and_counts_it_until_done() -> None:
    tasks = TaskSet()
    go = asyncio.Event()

    async def work() -> str:
        await go.wait()
        return "done"

    task = tasks.spawn(work())
    assert isinstance(task, asyncio.Task)
    assert len(tasks) == 1
    go.set()
    assert await task == "done"
    assert len(tasks) == 0


async def test_a_failed_task_leaves_the_set() -> None:
    tasks = TaskSet()

    async def fail() -> None:
        raise ValueError("boom")

    task = tasks.spawn(fail())
    with pytest.raises(ValueError, match="boom"):
        await task
    assert len(tasks) == 0


async def test_spawned_tasks_are_held() -> None:
    """A task nobody else refers to survives a full collection while the set holds it."""
    tasks = TaskSet()
    task = tasks.spawn(_forever())
    await asyncio.sleep(0)  # it starts, and waits on its own future
    ref = weakref.ref(task)
    del task
    gc.collect()
    held = ref()
    assert held is not None, "the task was collected mid-flight"
    assert not held.done()
    tasks.cancel()
    with pytest.raises(asyncio.CancelledError):
        await held


async def test_without_a_holder_such_a_task_is_collected() -> None:
    """The control for the test above: the same task, held by no one, is garbage."""
    loop = asyncio.get_running_loop()
    handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda loop, context: None)  # "Task was destroyed but it is pending"
    try:
        task = loop.create_task(_forever())
        await asyncio.sleep(0)
        ref = weakref.ref(task)
        del task
        gc.collect()
        assert ref() is None
    finally:
        loop.set_exception_handler(handler)


async def test_cancel_ends_the_running_tasks_and_spares_the_finished() -> None:
    tasks = TaskSet()
    finished = tasks.spawn(asyncio.sleep(0, result="kept"))
    assert await finished == "kept"
    running = [tasks.spawn(_forever()) for _ in range(3)]
    await asyncio.sleep(0)
    assert len(tasks) == 3
    tasks.cancel()
    results = await asyncio.gather(*running, return_exceptions=True)
    assert all(isinstance(result, asyncio.CancelledError) for result in results)
    assert len(tasks) == 0
    assert finished.result() == "kept"


async def test_a_task_spawned_after_cancel_runs() -> None:
    """cancel() ends what is running now; the set stays usable."""
    tasks = TaskSet()
    tasks.spawn(_forever())
    tasks.cancel()
    later = tasks.spawn(asyncio.sleep(0, result=1))
    assert await later == 1


async def test_cancel_reaches_a_task_spawned_by_a_task() -> None:
    tasks = TaskSet()
    children: list[asyncio.Task[None]] = []

    async def parent() -> None:
        children.append(tasks.spawn(_forever()))
        await _forever()

    first = tasks.spawn(parent())
    await asyncio.sleep(0)
    assert len(tasks) == 2
    tasks.cancel()
    await asyncio.gather(first, *children, return_exceptions=True)
    assert first.cancelled() and children[0].cancelled()
    assert len(tasks) == 0
