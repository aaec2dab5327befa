"""A connection's disconnect hook (and ``ClientGone``), shared by the gateway's HTTP protocol and the requests
it serves.

``GatewayHTTPProtocol`` gives each connection one ``ConnectionHook`` and puts it in its requests'
``scope["extensions"]``; the request being served sets ``on_lost``, which the protocol's
``connection_lost`` runs.  Under another ASGI server ``connection_hook`` finds none.
"""

from __future__ import annotations

from typing import Callable

from starlette.types import Scope


class ClientGone(Exception):
    """The HTTP client disconnected before the response was complete."""


EXTENSION = "pdserve.connection"  # the ConnectionHook's key in a scope's "extensions"


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
    return None if extensions is None else extensions.get(EXTENSION)
