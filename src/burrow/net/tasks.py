"""Tasks that belong to an owner (a relay, a session) and end with it.

asyncio keeps only weak references to tasks: a task nobody holds can be
collected mid-flight. :class:`TaskSet` holds each until it is done and
cancels what is left when its owner closes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class TaskSet:
    """Spawn and track tasks; :meth:`cancel` ends those still running."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as a task on the running loop, held until it is done."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def cancel(self) -> None:
        """Cancel every task still running (they end at their next await)."""
        for task in list(self._tasks):
            task.cancel()

    def __len__(self) -> int:
        return len(self._tasks)
