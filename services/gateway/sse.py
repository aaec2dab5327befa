"""Server-sent events framing and the ASGI plumbing for responses that watch the client.

Each event is ``data: <one JSON object>\\n\\n``; a stream ends with
``data: [DONE]\\n\\n``.  ``ClientWatch`` (``run_until_disconnect`` for one wait)
races a coroutine against the client's ``http.disconnect`` so that a request
whose client went away is cancelled (and its engine legs aborted) instead of
running to the end.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, TypeVar

import msgspec
from starlette.types import Receive, Scope, Send

from services.gateway.connection_hook import ClientGone, ConnectionHook

if TYPE_CHECKING:
    from services.gateway.direct import DirectRequest

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"
_HEADERS = ((b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no"),
            (b"content-type", b"text/event-stream; charset=utf-8"))

encode = msgspec.json.Encoder().encode


def event(obj: Any) -> bytes:
    """One SSE event holding ``obj`` as JSON."""
    return b"data: " + encode(obj) + b"\n\n"


class EventStream:
    """An SSE response: status 200 and its headers, then each item of ``events`` as one body write,
    the item that ends with ``[DONE]`` ending the body.  A client that disconnects stops it
    (``watch``, the request's ``ClientWatch``: closed here); ``cleanup()`` runs however it ends:
    completed, failed, cancelled, or never iterated at all (client gone before the first byte).
    An ASGI app, and a ``direct`` answer (``write``).

    It is the ASGI response itself rather than Starlette's ``StreamingResponse``, whose task group,
    disconnect-listening task and cancel scopes per response cost more than the events it sends.
    """

    __slots__ = ("events", "cleanup", "headers", "watch")

    def __init__(self, events: AsyncIterator[bytes], cleanup: Callable[[], None], request_id: str,
                 watch: ClientWatch):
        self.events = events
        self.cleanup = cleanup
        self.headers = [*_HEADERS, (b"x-request-id", request_id.encode("latin-1"))]
        self.watch = watch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start: dict | None = {"type": "http.response.start", "status": 200, "headers": self.headers}

        async def write(data: bytes, last: bool) -> None:
            nonlocal start
            if start is not None:
                await send(start)
                start = None
            await send({"type": "http.response.body", "body": data, "more_body": not last})

        await self._run(write)

    def write(self, request: DirectRequest) -> Awaitable[None]:
        """The stream on ``request`` (``direct``): its head leaves with the first event."""
        request.start(200, self.headers, length=False)
        return self._run(request.chunk)

    async def _run(self, write: Callable[[bytes, bool], Awaitable[None]]) -> None:
        try:
            await self.watch.run(self._send(write))
        except ClientGone:
            pass
        finally:
            self.watch.close()
            self.cleanup()

    async def _send(self, write: Callable[[bytes, bool], Awaitable[None]]) -> None:
        async for data in self.events:
            await write(data, data.endswith(DONE))


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
        self._on_disconnect = _ignore  # it refers to its owner, which refers to this watch
        if coro is not None:
            if self._future is not None:
                self._future.remove_done_callback(self._step)
                self._future = None
            coro.close()


def _ignore() -> None:
    pass


class ClientWatch:
    """Watches a request's client for the request's whole life (through its ``connection``'s hook
    when the server offers one, ``connection_hook.connection_hook``, else with one ``DisconnectWatch``;
    ``close()`` ends it): ``run(work)`` awaits ``work`` in the request's task, cancels it and raises
    ``ClientGone`` once the client disconnects (at once if it already has).  Outside ``run`` a
    disconnect is only noted.  A stream answers from two such waits (its first event, then its body)
    with one watch.  (Deadlines are the request run's: ``flow.RequestRun``.)"""

    __slots__ = ("_task", "_watch", "_connection", "_stopped_by", "_running")

    def __init__(self, receive: Receive | None, connection: ConnectionHook | None = None):
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._stopped_by: type[ClientGone] | None = None
        self._running = False
        self._connection = connection
        self._watch: DisconnectWatch | None = None
        if connection is None:
            assert receive is not None, "a ClientWatch needs the request's connection or its receive()"
            self._watch = DisconnectWatch(receive, self._gone)
        elif connection.lost:
            self._stopped_by = ClientGone
        else:
            connection.on_lost = self._gone

    async def run(self, work: Awaitable[T]) -> T:
        if self._stopped_by is not None:
            if asyncio.iscoroutine(work):
                work.close()
            raise self._stopped_by()
        self._running = True
        try:
            return await work
        except asyncio.CancelledError:
            if self._stopped_by is not None and self._task.uncancel() == 0:
                raise self._stopped_by() from None
            raise
        finally:
            self._running = False

    def close(self) -> None:
        if self._watch is not None:
            self._watch.close()
        elif self._connection is not None and self._connection.on_lost == self._gone:
            self._connection.on_lost = None  # it refers to this watch; the connection may serve another request

    def _gone(self) -> None:
        if self._stopped_by is None:
            self._stopped_by = ClientGone
            if self._running:
                self._task.cancel()


async def run_until_disconnect(receive: Receive | None, work: Awaitable[T],
                               connection: ConnectionHook | None = None) -> T:
    """Await ``work`` in this task; cancel it and raise ``ClientGone`` if the client disconnects
    first (a ``ClientWatch`` for one wait)."""
    watch = ClientWatch(receive, connection)
    try:
        return await watch.run(work)
    finally:
        watch.close()
