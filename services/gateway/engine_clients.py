"""One bus client per engine instance, and fire-and-forget aborts.

``abort(inst, request_id)`` sends ``Abort`` in the background (bounded by
``control_timeout_s``) so that a cancelled request can release its legs
without waiting; ``close()`` waits for the aborts still in flight (bounded by
the same timeout) before closing the sockets.
"""

from __future__ import annotations

import asyncio
import logging

from common.bus import BusClient
from common.errors import BusError
from common.messages import Abort, Instance

log = logging.getLogger(__name__)


class EngineClients:
    def __init__(self, *, control_timeout_s: float, stream_timeout_s: float, on_abort=None):
        self.control_timeout_s = control_timeout_s
        self.stream_timeout_s = stream_timeout_s
        self.on_abort = on_abort  # callable(inst) counting aborts, or None
        self._clients: dict[str, BusClient] = {}  # instance id -> client of its request endpoint
        self._aborts: set[asyncio.Task] = set()

    def get(self, inst: Instance) -> BusClient:
        client = self._clients.get(inst.id)
        if client is None or client.endpoint != inst.request_endpoint:
            if client is not None:
                self._close_later(client)
            client = BusClient(inst.request_endpoint, name=f"gateway->{inst.id}", timeout=self.stream_timeout_s)
            self._clients[inst.id] = client
        return client

    def drop(self, inst: Instance) -> None:
        """``inst`` left the membership: close its client (its pending calls fail with PeerGone)."""
        client = self._clients.pop(inst.id, None)
        if client is not None:
            self._close_later(client)

    def abort(self, inst: Instance, request_id: str) -> None:
        """Tell ``inst`` to abort ``request_id`` (and release its pinned KV), in the background."""
        if self.on_abort is not None:
            self.on_abort(inst)
        task = asyncio.get_running_loop().create_task(self._abort(inst, request_id))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def _abort(self, inst: Instance, request_id: str) -> None:
        client = self._clients.get(inst.id)
        temporary = client is None or client.endpoint != inst.request_endpoint
        if temporary:  # the instance left the membership: it may still hold the request
            client = BusClient(inst.request_endpoint, name=f"gateway-abort->{inst.id}")
        try:
            await client.call(Abort(request_id=request_id), timeout=self.control_timeout_s)
        except BusError as e:  # gone, timed out, or it no longer knows the request: nothing left to free
            log.info("abort of %s on %s: %s", request_id, inst.id, e)
        finally:
            if temporary:
                await client.close()

    def _close_later(self, client: BusClient) -> None:
        task = asyncio.get_running_loop().create_task(client.close())
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def close(self) -> None:
        if self._aborts:
            await asyncio.wait(list(self._aborts), timeout=self.control_timeout_s)
        clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
