"""Test-only helpers: waiting on a condition with a deadline.

The service processes and the engine driver that tests share with the benchmarks
live in ``bench/processes.py`` and ``bench/engine_driver.py``.
"""

from __future__ import annotations

import asyncio
import inspect
import time


async def eventually(predicate, timeout: float = 5.0, interval: float = 0.02) -> None:
    """Wait until ``predicate()`` (sync or async) is true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout:g} s")
        await asyncio.sleep(interval)
