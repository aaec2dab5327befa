"""Admission: how many generation requests run at once, and the bounded queue of those waiting.

At most ``max_inflight`` requests run (hold a slot; ``resize`` changes it, e.g. as
engines join and leave); up to ``max_queued`` more wait for one, first come first
served.  A request that finds the queue full is refused
at once with a 429 (``queue_full``); one that waited ``queue_timeout_s`` without a
slot gets a 503 (``queue_timeout``: the engines are saturated).  Both carry
``Retry-After``.  So overload is shed before a request starts, never by failing
it mid-flight.  A waiter that goes away (its client disconnected) leaves the
queue; a slot it was handed at that moment goes to the next one.
"""

from __future__ import annotations

import asyncio
from collections import deque

from services.gateway.errors import APIError


class Admission:
    """``try_acquire()`` (or, when it says no, ``await acquire()``) before a request runs, ``release()``
    once it ended: exactly once per slot taken."""

    __slots__ = ("max_inflight", "max_queued", "queue_timeout_s", "retry_after_s", "running", "waiters")

    def __init__(self, max_inflight: int, max_queued: int, queue_timeout_s: float, retry_after_s: int):
        self.max_inflight, self.max_queued = max_inflight, max_queued
        self.queue_timeout_s, self.retry_after_s = queue_timeout_s, retry_after_s
        self.running = 0  # slots held
        self.waiters: deque[asyncio.Future[None]] = deque()  # resolved when handed a slot

    def try_acquire(self) -> bool:
        """Take a free slot if there is one and nobody waits for it (no waiting, no task)."""
        if self.running < self.max_inflight and not self.waiters:
            self.running += 1
            return True
        return False

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue for one; raises the 429 when the queue is full, the 503
        after ``queue_timeout_s`` (or the error of ``refuse_waiting``); cancelled (the client went
        away), it leaves the queue."""
        if self.try_acquire():
            return
        if len(self.waiters) >= self.max_queued:
            raise APIError(429, f"too many requests: {self.running} running and {len(self.waiters)} queued "
                           "(the gateway's --max-queued-requests)", code="queue_full",
                           retry_after=self.retry_after_s)
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await waiter
        except BaseException as e:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()  # handed a slot just as it gave up: pass it on
            elif waiter in self.waiters:  # a release may already have dropped it, cancelled
                self.waiters.remove(waiter)
            if isinstance(e, TimeoutError):
                raise APIError(503, f"no capacity: queued {self.queue_timeout_s:g} s without a free slot "
                               "(the engines are saturated)", code="queue_timeout",
                               retry_after=self.retry_after_s) from None
            raise

    def resize(self, max_inflight: int) -> None:
        """Run at most ``max_inflight`` requests from now on: waiters take the slots a raise frees; a cut
        takes effect as running requests end."""
        self.max_inflight = max_inflight
        while self.running < max_inflight and self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                self.running += 1
                waiter.set_result(None)

    def release(self) -> None:
        """A slot is free again: handed to the first waiter (unless a cut leaves too many running),
        else returned."""
        while self.waiters and self.running <= self.max_inflight:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running -= 1

    def refuse_waiting(self, error: APIError) -> None:
        """Every request still queued fails with ``error`` (shutdown)."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)
