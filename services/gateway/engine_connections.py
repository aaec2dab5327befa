"""The gateway's bus clients to engine instances, and fire-and-forget aborts.

One client per instance request endpoint (a ``common.client_pool.ClientPool``);
an instance that leaves the membership, or re-registers on another endpoint,
has its old client dropped (its pending calls fail with ``PeerGone``).
``abort(inst, request_id)`` sends ``Abort`` in the background, bounded by
``control_timeout_s``, so that a cancelled request releases its legs without
waiting; an instance that already left is reached through a temporary client.
``close()`` waits for the aborts still in flight (bounded by the same timeout)
before closing the sockets.
"""

from __future__ import annotations

import logging
from typing import Callable

from common.bus import BusClient
from common.client_pool import ClientPool
from common.errors import BusError
from common.messages import Abort, Instance, Role
from common.tasks import BackgroundTasks

log = logging.getLogger(__name__)


class EngineConnections:
    """Clients of the engines' request endpoints; ``on_abort(role)`` hears every abort sent."""

    def __init__(self, *, control_timeout_s: float, on_abort: Callable[[Role], None]):
        """Legs time themselves (``BusClient.request``); the pool's default timeout bounds the aborts."""
        self.control_timeout_s = control_timeout_s
        self.on_abort = on_abort
        self._pool = ClientPool(name="gateway", timeout=control_timeout_s)
        self._endpoints: dict[str, str] = {}  # instance id -> the request endpoint it registered last
        self._aborts = BackgroundTasks()

    def get(self, inst: Instance) -> BusClient:
        """The client of ``inst``'s request endpoint, connecting on first use."""
        return self._pool.get(inst.request_endpoint)

    def track(self, inst: Instance) -> None:
        """``inst`` joined or was updated: a client of its previous endpoint, if it moved, is dropped."""
        previous = self._endpoints.get(inst.id)
        if previous != inst.request_endpoint:
            if previous is not None:
                self._pool.drop(previous)
            self._endpoints[inst.id] = inst.request_endpoint

    def drop(self, inst: Instance) -> None:
        """``inst`` left the membership: close its client (its pending calls fail with ``PeerGone``)."""
        self._pool.drop(self._endpoints.pop(inst.id, inst.request_endpoint))

    def abort(self, inst: Instance, request_id: str) -> None:
        """Tell ``inst`` to abort ``request_id`` (and release its pinned KV), in the background."""
        self.on_abort(inst.role)
        self._aborts.spawn(self._abort(inst, request_id))

    async def _abort(self, inst: Instance, request_id: str) -> None:
        temporary = inst.request_endpoint not in self._pool
        if temporary:  # the instance left the membership: it may still hold the request
            client = BusClient(inst.request_endpoint, name=f"gateway-abort->{inst.id}")
        else:
            client = self._pool.get(inst.request_endpoint)
        try:
            await client.call(Abort(request_id=request_id), timeout=self.control_timeout_s)
        except BusError as e:  # gone, timed out, or it no longer knows the request: nothing left to free
            log.info("abort of %s on %s: %s", request_id, inst.id, e)
        finally:
            if temporary:
                await client.close()

    async def close(self) -> None:
        await self._aborts.wait(self.control_timeout_s)
        await self._pool.close()
