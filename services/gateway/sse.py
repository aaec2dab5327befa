"""Server-sent events framing and the ASGI plumbing for responses that watch the client.

Each event is ``data: <one JSON object>\\n\\n``; a stream ends with
``data: [DONE]\\n\\n``.  ``run_until_disconnect`` races a coroutine against the
client's ``http.disconnect`` so that a request whose client went away is
cancelled (and its engine legs aborted) instead of running to the end.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import msgspec
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CONTENT_TYPE = "text/event-stream; charset=utf-8"

encode = msgspec.json.Encoder().encode


def event(obj: Any) -> bytes:
    """One SSE event holding ``obj`` as JSON."""
    return b"data: " + encode(obj) + b"\n\n"


class EventStream:
    """An SSE response: status 200 and its headers, then each item of ``events`` as one body write,
    the item that ends with ``[DONE]`` ending the body.  A client that disconnects stops it
    (``run_until_disconnect``); ``cleanup()`` runs however it ends: completed, failed, cancelled, or
    never iterated at all (client gone before the first byte).

    It is the ASGI response itself rather than Starlette's ``StreamingResponse``, whose task group,
    disconnect-listening task and cancel scopes per response cost more than the events it sends.
    """

    __slots__ = ("events", "cleanup", "headers")

    def __init__(self, events: AsyncIterator[bytes], cleanup: Callable[[], None], headers: dict[str, str]):
        self.events = events
        self.cleanup = cleanup
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1"))
                        for k, v in {**HEADERS, **headers, "Content-Type": CONTENT_TYPE}.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await run_until_disconnect(receive, self._send(send))
        except ClientGone:
            pass
        finally:
            self.cleanup()

    async def _send(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        async for data in self.events:
            await send({"type": "http.response.body", "body": data, "more_body": not data.endswith(DONE)})


class ClientGone(Exception):
    """The HTTP client disconnected before the response was complete."""


class DisconnectWatch:
    """Calls ``on_disconnect()`` once ``receive()`` answers ``http.disconnect``; ``close()`` stops watching.

    It runs without a Task: the ``receive()`` coroutine is stepped by hand from the
    done-callback of the future it awaits, which is what a Task does minus the
    scheduling.  A Task per request would cost two event-loop steps (start, then
    cancel) and a registry entry, a measurable share of a short request's cost.
    Valid for any ``receive`` that only awaits asyncio futures (ASGI servers do).
    """

    __slots__ = ("_receive", "_on_disconnect", "_coro", "_future")

    def __init__(self, receive: Receive, on_disconnect: Callable[[], None]):
        self._receive = receive
        self._on_disconnect = on_disconnect
        self._coro: Any = receive()
        self._future: asyncio.Future | None = None
        self._step(None)

    def _step(self, _: asyncio.Future | None) -> None:
        while self._coro is not None:
            try:
                self._future = self._coro.send(None)
            except StopIteration as answered:
                if answered.value["type"] == "http.disconnect":
                    self._coro = None
                    self._on_disconnect()
                else:  # a body chunk nobody asked for: keep listening
                    self._coro = self._receive()
                continue
            except BaseException:  # receive() itself failed (the server is closing): stop watching
                self._coro = None
                raise
            self._future.add_done_callback(self._step)
            return

    def close(self) -> None:
        coro, self._coro = self._coro, None
        if coro is not None:
            if self._future is not None:
                self._future.remove_done_callback(self._step)
            coro.close()


async def run_until_disconnect(receive: Receive, work: Awaitable[T], deadline: float | None = None) -> T:
    """Await ``work`` in this task; cancel it and raise ``ClientGone`` if the client disconnects
    first, or ``TimeoutError`` if the loop's clock reaches ``deadline`` first."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    stopped_by: type[Exception] | None = None

    def stop(reason: type[Exception]) -> None:
        nonlocal stopped_by
        if stopped_by is None:
            stopped_by = reason
            task.cancel()

    watch = DisconnectWatch(receive, partial(stop, ClientGone))
    timer = None if deadline is None else loop.call_at(deadline, stop, TimeoutError)
    try:
        return await work
    except asyncio.CancelledError:
        if stopped_by is not None and task.uncancel() == 0:
            raise stopped_by() from None
        raise
    finally:
        watch.close()
        if timer is not None:
            timer.cancel()
