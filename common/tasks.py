"""Background tasks an owner starts but must not await where it starts them, and waking a waiter.

asyncio keeps only weak references to tasks, so a fire-and-forget task can be
garbage-collected mid-run; ``BackgroundTasks`` holds each until it ends and
lets its owner wait for whatever is still running at shutdown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


class BackgroundTasks:
    """A set of running tasks; each leaves the set when it ends."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """Run ``coro`` on the running loop and keep it referenced until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def wait(self, timeout: float | None = None) -> None:
        """Wait for the running tasks (their errors are theirs to log) for at most ``timeout`` seconds."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)


def wake(waiter: asyncio.Future) -> None:
    """Resolve ``waiter`` with None unless it is already done (cancelled meanwhile, or woken before): the
    callback a timer or a deferred wake-up runs."""
    if not waiter.done():
        waiter.set_result(None)
