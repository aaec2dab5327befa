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
requests' ``scope["extensions"]`` (``connection_hook(scope)``): the request being served sets its
``on_lost``, which runs once when the connection closes.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from starlette.types import Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

_HEAD_START = b"HTTP/1.1 "
_HEAD_END = b"\r\n\r\n"
_EXTENSION = "pdserve.connection"  # the ConnectionHook's key in a scope's "extensions"


class ConnectionHook:
    """One connection's: ``on_lost()`` (set by the request being served, None between requests) runs
    once when the connection closes; ``lost`` says whether it has."""

    __slots__ = ("on_lost", "lost")

    def __init__(self) -> None:
        self.on_lost: Callable[[], None] | None = None
        self.lost = False

    def closed(self) -> None:
        self.lost = True
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost()


def connection_hook(scope: Scope) -> ConnectionHook | None:
    """The ``ConnectionHook`` of the request's connection (None under another ASGI server)."""
    extensions = scope.get("extensions")
    return None if extensions is None else extensions.get(_EXTENSION)


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
    (pass the class as ``uvicorn.Config(http=...)``)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._hook = ConnectionHook()
        self._extensions = {_EXTENSION: self._hook}
        super().connection_made(HeadWithBody(transport, self.loop))  # type: ignore[arg-type]

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = self._extensions  # type: ignore[typeddict-unknown-key]

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._hook.closed()
