"""One generation request in flight: its choices, deadline, output target and cleanup."""

from __future__ import annotations

import asyncio
import time

from services.gateway.context import FlowContext
from services.gateway.errors import APIError
from services.gateway.flow import ChoiceRun, ChoiceStats, Emit
from services.gateway.openai_protocol import ParsedRequest

CLIENT_GONE = 499  # the status logged for requests whose client disconnected


class RequestRun:
    """Every choice of ``req`` (prompt-major, ``n`` per prompt), run concurrently; pieces go to ``emit``.

    ``stats`` holds one ``ChoiceStats`` per choice.  ``done`` resolves once every
    choice finished, or with the first choice's error, the others then being
    cancelled.  ``deadline`` (the loop's clock) is when the request times out.
    ``close(status)`` is the run's one cleanup, whoever ends it (the JSON answer,
    the event stream, a failure): it stops every choice still running (aborting
    their legs, freeing their router slots), reports the request to the observer
    and releases the request id.  A second ``close`` does nothing.
    """

    __slots__ = ("context", "req", "request_id", "endpoint", "started_at", "deadline", "emit", "stats", "done",
                 "closed", "_remaining", "_runs")

    def __init__(self, context: FlowContext, req: ParsedRequest, request_id: str, endpoint: str,
                 started_at: float, emit: Emit):
        """``request_id`` is already reserved in ``context.request_ids``; ``started_at`` is the
        ``time.perf_counter()`` at which the HTTP request arrived."""
        total = len(req.prompts) * req.n
        loop = asyncio.get_running_loop()
        self.context, self.req, self.request_id, self.endpoint = context, req, request_id, endpoint
        self.started_at = started_at
        self.deadline = loop.time() + context.config.request_timeout_s
        self.emit = emit
        self.stats = [ChoiceStats() for _ in range(total)]
        self.done: asyncio.Future[None] = loop.create_future()
        self.closed = False
        self._remaining = total
        self._runs = [ChoiceRun(self, i) for i in range(total)]

    def start(self) -> None:
        """Send every choice's first leg."""
        for run in self._runs:
            run.start()

    def timed_out(self) -> APIError:
        """The 504 of a request past its deadline."""
        return APIError(504, f"request exceeded {self.context.config.request_timeout_s:g} s", code="request_timeout")

    def close(self, status: int = CLIENT_GONE) -> None:
        """End the run, answered with ``status`` (by default: the client went away)."""
        if self.closed:
            return
        self.closed = True
        self._cancel()
        self.context.observer.on_request_done(self.endpoint, status, time.perf_counter() - self.started_at,
                                              self.stats)
        self.context.request_ids.release(self.request_id)

    def choice_done(self, error: APIError | None) -> None:
        """A choice ended by itself (``error`` None or its ``APIError``)."""
        if self.done.done():
            return
        if error is not None:
            self._cancel()
            self.done.set_exception(error)
            return
        self._remaining -= 1
        if self._remaining == 0:
            self.done.set_result(None)

    def _cancel(self) -> None:
        for run in self._runs:
            run.cancel()
