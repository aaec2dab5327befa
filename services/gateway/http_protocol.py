"""uvicorn's HTTP/1.1 protocol (httptools): a response's head leaving in the same write as its body, and
a hook that tells the request being served that its connection closed.

uvicorn writes a response's status line and headers (ASGI's ``http.response.start``) as one
write to the socket and each body part as another, so a JSON answer costs two send system
calls and, with ``TCP_NODELAY`` (uvloop sets it), two TCP segments and two wake-ups of its
client.  ``GatewayHTTPProtocol`` gives uvicorn's request cycles a ``HeadWithBody`` transport
instead: a head waits for the next write on its connection (the body's first bytes, sent at
once by every response of the gateway) and leaves with it; a head whose body is not written in
the same loop iteration leaves alone at the end of it, and closing the connection sends it first.

A request learns that its client went away from an ASGI ``receive()`` left pending (``http.disconnect``):
a coroutine, an ``asyncio.Event`` wait and its future per request, and closing them when it is
answered.  Each connection of ``GatewayHTTPProtocol`` has one ``ConnectionHook`` instead, in its
requests' ``scope["extensions"]`` (``connection_hook.py``): the request being served sets its
``on_lost``, which runs once when the connection closes.

The generation routes skip uvicorn's ASGI request cycle altogether: ``GatewayHTTPProtocol``
serves them as ``direct.DirectRequest``s (the bytes written are the ones the cycle would write),
and its keep-alive timeout is one timer per connection instead of one per request.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from starlette.types import Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from services.gateway.connection_hook import EXTENSION, ConnectionHook
from services.gateway.direct import DirectHandler, DirectRequest

_HEAD_START = b"HTTP/1.1 "
_HEAD_END = b"\r\n\r\n"
class HeadWithBody:
    """A transport whose writes of a response head (``HTTP/1.1 ...\\r\\n\\r\\n``) are held until the next
    write or the end of the loop iteration; everything else is ``transport``'s own."""

    __slots__ = ("transport", "_loop", "_held")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop):
        self.transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self.transport.write(held + data)
        elif data.startswith(_HEAD_START) and data.endswith(_HEAD_END):
            self._held = data
            self._loop.call_soon(self.flush)
        else:
            self.transport.write(data)

    def flush(self) -> None:
        """Write the held head, if any."""
        held, self._held = self._held, None
        if held is not None and not self.transport.is_closing():
            self.transport.write(held)

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class GatewayHTTPProtocol(HttpToolsProtocol):
    """uvicorn's ``HttpToolsProtocol`` over ``HeadWithBody``, with a ``ConnectionHook`` per connection
    (pass the class as ``uvicorn.Config(http=...)``, or a ``functools.partial`` of it with ``direct``).

    ``direct`` maps raw paths to handlers served as ``direct.DirectRequest``s (a ``POST`` over HTTP/1.1,
    not behind an unfinished request, without ``Expect: 100-continue``), their bodies within ``max_body``
    bytes; every other request is uvicorn's.  The keep-alive timeout is one timer per connection,
    armed after an answer and re-armed when it fires early, instead of a ``call_later`` and its
    cancellation per request: an idle connection still closes ``timeout_keep_alive`` after its last
    answer, a busy one never."""

    def __init__(self, *args: Any, direct: dict[bytes, DirectHandler] | None = None, max_body: int = 0,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        # uvicorn's concurrency limit and access log apply to its own request cycles only
        self.direct = direct if direct and self.limit_concurrency is None and not self.access_log else {}
        self.max_body = max_body
        self._idle_since: float | None = None  # when the connection last went idle; None while busy
        self._default_headers: list[tuple[bytes, bytes]] | None = None
        self._default_head = b""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.hook = ConnectionHook()
        self._extensions = {EXTENSION: self.hook}
        self.raw_transport = transport
        super().connection_made(HeadWithBody(transport, self.loop))  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        if type(cycle) is DirectRequest:
            self.cycle = None  # type: ignore[assignment]  # uvicorn's part below is for its own cycles
            cycle.lost()
        super().connection_lost(exc)
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        self.hook.closed()

    def default_head(self) -> bytes:
        """uvicorn's default headers (``date``...: it renews them every second) as head lines."""
        headers = self.server_state.default_headers
        if headers is not self._default_headers:
            self._default_headers = headers
            self._default_head = b"".join(b"%b: %b\r\n" % pair for pair in headers)
        return self._default_head

    # -- parser callbacks ----------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.expect_100_continue = False
        self.headers = []  # the ASGI scope is made for uvicorn's cycles only (on_headers_complete)

    def on_headers_complete(self) -> None:
        handler = self.direct.get(self.url)
        parser = self.parser
        if (handler is not None and not self.expect_100_continue and parser.get_method() == b"POST"
                and parser.get_http_version() == "1.1" and not parser.should_upgrade()
                and (self.cycle is None or self.cycle.response_complete)):
            self.cycle = DirectRequest(self, handler, self.headers, parser.should_keep_alive(),  # type: ignore
                                       self.max_body)
            return
        url, headers, expect = self.url, self.headers, self.expect_100_continue
        super().on_message_begin()
        self.url, self.headers, self.expect_100_continue = url, headers, expect
        self.scope["headers"] = headers
        self.scope["extensions"] = self._extensions  # type: ignore[typeddict-unknown-key]
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if type(cycle) is DirectRequest:
            cycle.on_body(body)
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if type(cycle) is DirectRequest:
            cycle.on_complete()
        else:
            super().on_message_complete()

    # -- keep-alive ----------------------------------------------------------

    def _unset_keepalive_if_required(self) -> None:
        self._idle_since = None  # busy: a timer that fires now finds it so and waits for the next answer

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            self._idle_since = None
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle_since = now = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_at(now + self.timeout_keep_alive, self._idle_check)

    def _idle_check(self) -> None:
        self.timeout_keep_alive_task = None
        if self._idle_since is None:
            return
        deadline = self._idle_since + self.timeout_keep_alive
        if deadline > self.loop.time():
            self.timeout_keep_alive_task = self.loop.call_at(deadline, self._idle_check)
        else:
            self.timeout_keep_alive_handler()
