"""Accepting every connection waiting on a listening socket at each wake-up of the event loop, not one.

libuv (under uvloop's ``loop.create_server``) accepts one connection each time the listening socket
is reported readable: one per loop iteration.  A busy gateway's iteration handles hundreds of
requests and lasts tens of milliseconds, so a burst of new connections (a client opening its pool,
clients reconnecting after a restart) waits in the kernel's accept queue for as many iterations as
there are connections: 512 connections opened at once to a loaded gateway had their first requests
answered after up to 4 s while the connections accepted first were served in ~50 ms.

``Acceptor`` watches a listening socket with ``loop.add_reader`` and accepts up to ``ACCEPT_BATCH``
connections per wake-up, each then served by a protocol from ``factory`` through
``loop.connect_accepted_socket`` (the transport uvloop gives an accepted connection, ``TCP_NODELAY``
included).  It stands where uvicorn's ``Server`` keeps an ``asyncio.Server`` (``sockets``,
``close()``, ``wait_closed()``).  Out of file descriptors (``EMFILE``...), it logs, stops watching
and tries again after ``RETRY_S``, as asyncio's own accept loop does.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Callable

log = logging.getLogger(__name__)

ACCEPT_BATCH = 1024  # connections accepted per wake-up at most: the rest wait for the next iteration
RETRY_S = 1.0
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address ``host`` resolves to on ``port`` (not listening yet), as
    ``loop.create_server(host=..., port=...)`` binds them: ``SO_REUSEADDR``, IPv6 sockets IPv6 only.
    Raises ``OSError`` when one cannot bind (none is left open)."""
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                  flags=socket.AI_PASSIVE):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Acceptor:
    """Listens on ``sock`` (bound) with ``backlog``; each connection accepted gets a protocol from
    ``factory``.  ``close()`` stops accepting and closes the socket (connections already accepted are
    their protocols' to close)."""

    def __init__(self, sock: socket.socket, factory: Callable[[], asyncio.Protocol], backlog: int):
        sock.setblocking(False)
        sock.listen(backlog)
        self.sockets = [sock]
        self._sock, self._factory = sock, factory
        self._loop = asyncio.get_running_loop()
        self._opening: set[asyncio.Task] = set()  # connect_accepted_socket still running
        self._closed = False
        self._retry: asyncio.TimerHandle | None = None
        self._loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                if e.errno not in _RESOURCE_ERRORS:
                    raise
                log.error("cannot accept connections (%s): trying again in %g s", e, RETRY_S)
                self._loop.remove_reader(self._sock.fileno())
                self._retry = self._loop.call_later(RETRY_S, self._resume)
                return
            task = self._loop.create_task(self._loop.connect_accepted_socket(self._factory, conn))
            self._opening.add(task)
            task.add_done_callback(self._opened)

    def _opened(self, task: asyncio.Task) -> None:
        self._opening.discard(task)
        if not task.cancelled() and (e := task.exception()) is not None:
            log.warning("an accepted connection could not be served: %s", e)

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    async def wait_closed(self) -> None:
        """Returns once no accepted connection is still being set up."""
        if self._opening:
            await asyncio.wait(self._opening)
