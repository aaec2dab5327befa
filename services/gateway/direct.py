"""A generation request served on the gateway's own HTTP protocol, without uvicorn's ASGI request cycle.

``GatewayHTTPProtocol`` hands ``POST /v1/completions`` and ``POST /v1/chat/completions`` (HTTP/1.1, not
pipelined behind an unfinished request, no ``Expect: 100-continue``) to a ``DirectRequest`` instead of
uvicorn's ``RequestResponseCycle``: the body is collected by the parser's callbacks (within
``max_body`` bytes: past it the rest is dropped and the handler answers 413, the connection closed
if the body has not ended within ``DISCARD_S``), the handler's task starts once it has ended, and the
answer leaves as raw bytes: a JSON answer's head and body in one write, a stream's head with its
first event, each event one chunk.  The bytes are the ones uvicorn would write for the same ASGI
messages (status line, uvicorn's default headers, the response's, ``connection: close`` when the
connection ends, ``transfer-encoding: chunked`` without a length); what is skipped is the per-request
scope, ``asyncio.Event``, ``receive``/``send`` messages and header checks (every header here is the
gateway's own, ``X-Request-Id`` validated by ``request_ids``).  Everything else (other paths and
methods, pipelined requests) stays on the ASGI path.

A handler is ``async (DirectRequest) -> response``; the response's ``write(request)`` writes it (a
JSON answer at once, returning None; a stream returns the coroutine that sends its events).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Protocol

from uvicorn.protocols.http.httptools_impl import STATUS_LINE

from services.gateway.connection_hook import ClientGone, ConnectionHook
from services.gateway.limits import DISCARD_S, too_large

log = logging.getLogger(__name__)

DirectHandler = Callable[["DirectRequest"], Awaitable[Any]]  # its answer has ``write(request)``

_CLOSE = b"connection: close\r\n"
_CHUNKED = b"transfer-encoding: chunked\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_ERROR_500 = ((b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"21"))  # + connection: close


class DirectConnection(Protocol):
    """What a direct request needs of its connection (``http_protocol.GatewayHTTPProtocol``)."""

    hook: ConnectionHook
    raw_transport: asyncio.Transport
    flow: Any  # uvicorn's FlowControl
    loop: asyncio.AbstractEventLoop
    tasks: set[asyncio.Task]

    def default_head(self) -> bytes:
        """The server's default headers (date, server), encoded."""

    def on_response_complete(self) -> None:
        """The answer is written: the connection may take its next request."""


class DirectRequest:
    """One request of a ``GatewayHTTPProtocol`` connection, served by ``handler``.

    To the protocol it stands where uvicorn's ``RequestResponseCycle`` would (``keep_alive``,
    ``response_complete``, ``disconnected``): ``on_body``/``on_complete`` from the parser, ``lost()``
    when the connection closes.  To the handler it offers ``headers`` (lowercase names), ``read_body()``,
    ``connection`` (the ``ConnectionHook``) and the writes: ``start`` then ``send`` (``chunk`` for a
    stream's events, waiting while the transport's buffer is full)."""

    __slots__ = ("protocol", "handler", "headers", "keep_alive", "connection", "response_complete", "disconnected",
                 "_chunks", "_size", "_limit", "_too_large", "_body_done", "_started", "_head", "_chunked", "_sent",
                 "_discard")

    def __init__(self, protocol: DirectConnection, handler: DirectHandler,
                 headers: list[tuple[bytes, bytes]], keep_alive: bool, limit: int):
        self.protocol, self.handler, self.headers, self.keep_alive = protocol, handler, headers, keep_alive
        self.connection: ConnectionHook = protocol.hook
        self.response_complete = self.disconnected = False
        self._chunks: list[bytes] = []
        self._size, self._limit = 0, limit
        self._too_large = self._body_done = self._started = self._chunked = self._sent = False
        self._head: bytes | None = None  # written with the next bytes
        self._discard: asyncio.TimerHandle | None = None
        for name, value in headers:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                self._drop_body()

    # -- from the parser -----------------------------------------------------

    def on_body(self, data: bytes) -> None:
        if self._too_large:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._drop_body()
        else:
            self._chunks.append(data)

    def on_complete(self) -> None:
        self._body_done = True
        self._run()

    def lost(self) -> None:
        """The connection closed: nothing more is written; a request whose body had not ended is
        handled now (``read_body`` raises ``ClientGone``: it counts as a 499)."""
        self.disconnected = True
        self._run()

    # -- for the handler -----------------------------------------------------

    async def read_body(self) -> bytes:
        """The whole body; raises 413 past the limit, ``ClientGone`` when the client left before its end."""
        if self._too_large:
            raise too_large(self._limit)
        if not self._body_done:
            raise ClientGone()
        return self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)

    def start(self, status: int, headers: list[tuple[bytes, bytes]] | tuple, *, length: bool) -> None:
        """The response's head (``length``: its headers carry a content-length, else the body is chunked);
        it leaves with the first ``send``."""
        head = [STATUS_LINE[status], self.protocol.default_head()]
        for name, value in headers:
            head += (name, b": ", value, b"\r\n")
        if not self.keep_alive:
            head.append(_CLOSE)
        self._chunked = not length
        if not length:
            head.append(_CHUNKED)
        head.append(b"\r\n")
        self._head = b"".join(head)

    def send(self, data: bytes, last: bool = True) -> None:
        """Body bytes (one chunk when chunked), with the head if it has not left yet; ``last`` ends the response."""
        if self._chunked:
            data = b"%x\r\n%b\r\n%b" % (len(data), data, _LAST_CHUNK if last else b"") if data else (
                _LAST_CHUNK if last else b"")
        if self._head is not None:
            data, self._head = self._head + data, None
        if not self.disconnected and data:
            self.protocol.raw_transport.write(data)
            self._sent = True
        if last:
            self._complete()

    async def chunk(self, data: bytes, last: bool) -> None:
        """``send`` for a stream, once the transport's buffer has room."""
        flow = self.protocol.flow
        if flow.write_paused and not self.disconnected:
            await flow.drain()
        self.send(data, last)

    # -- internals -----------------------------------------------------------

    def _drop_body(self) -> None:
        self._too_large, self._chunks = True, []
        self._discard = self.protocol.loop.call_later(DISCARD_S, self._give_up_body)

    def _give_up_body(self) -> None:
        """The oversized body has not ended within ``DISCARD_S``: answer now and close the connection."""
        self.keep_alive = False
        self._run()

    def _run(self) -> None:
        if self._started:
            return
        self._started = True
        if self._discard is not None:
            self._discard.cancel()
        protocol = self.protocol
        task = protocol.loop.create_task(self._serve())
        task.add_done_callback(protocol.tasks.discard)
        protocol.tasks.add(task)

    async def _serve(self) -> None:
        try:
            response = await self.handler(self)
            writing = response.write(self)
            if writing is not None:
                await writing
        except BaseException as e:  # as uvicorn's cycle: logged, a 500 when nothing was sent yet
            log.error("Exception in a generation request", exc_info=e)
            if not self._sent and not self.response_complete:
                self.keep_alive = False
                self.start(500, _ERROR_500, length=True)
                self.send(b"Internal Server Error")
            else:
                self.protocol.raw_transport.close()

    def _complete(self) -> None:
        if self.response_complete:
            return
        self.response_complete = True
        protocol = self.protocol
        if not self.keep_alive:
            protocol.raw_transport.close()
        protocol.on_response_complete()
