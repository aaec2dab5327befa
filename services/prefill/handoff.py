"""Life cycle of a request in the prefill server, and the one owner of its pinned KV.

1. ``Generate(do_remote_decode)`` arrives.  ``begin`` opens the request's
   transfer (state ``COMPUTING``); its id is ``<engine id>/<request id>``, so
   nothing maps requests to transfers.  The engine computes the prompt and the
   first token, then pins the prompt's blocks under that id instead of freeing them.
2. The final output (finish reason ``remote_decode``) comes back: ``lease`` moves
   the transfer to ``LEASED`` and starts its lease; the reply carries the
   ``KVTransferParams`` the gateway hands to a decode engine.
3. The decode engine handshakes with the side channel, reads the blocks
   (renewing the lease meanwhile) and sends ``ReleaseKV``: ``release``.
4. The transfer is released, exactly once, by the first of:
   ``ReleaseKV`` (``release``), ``Abort`` (``abort``), lease expiry (``expire``),
   an ``Abort`` that raced with the finish (``lease`` after ``abort``), the
   request's stream ending before its finish was leased (cancelled around the
   finish: ``settle``), or shutdown (``release_all``).  Releasing removes the
   transfer, so every later attempt finds nothing: the engine's unpin is called
   from one place (``_release``), once per transfer.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable

from common.errors import PeerError
from common.kv_transfer.leases import LeaseTable
from common.tasks import BackgroundTasks

log = logging.getLogger(__name__)

Unpin = Callable[[str], Awaitable[object]]
"""The engine port: give a transfer id's pinned blocks back (nothing pinned under it: no-op)."""


class TransferState(enum.Enum):
    COMPUTING = "computing"  # the engine runs the prompt; it may pin blocks at the finish
    ABORTED = "aborted"  # an Abort came while computing: release instead of leasing
    LEASED = "leased"  # pinned, waiting for the reader under a lease


class PrefillHandoff:
    """Transfer id -> state of every request whose KV prefill holds or may hold for a reader."""

    def __init__(self, engine_id: str, leases: LeaseTable, unpin: Unpin):
        self.engine_id = engine_id
        self.leases = leases
        self._unpin = unpin
        self._transfers: dict[str, TransferState] = {}
        self._unpinning = BackgroundTasks()

    def __len__(self) -> int:
        """Transfers not yet released."""
        return len(self._transfers)

    def transfer_id(self, request_id: str) -> str:
        return f"{self.engine_id}/{request_id}"

    def begin(self, request_id: str) -> str:
        """Open the request's transfer; returns its id.  ``PeerError`` while one is still open."""
        transfer_id = self.transfer_id(request_id)
        if transfer_id in self._transfers:
            raise PeerError("invalid_request", f"request {request_id!r} is already running here", "request_id")
        self._transfers[transfer_id] = TransferState.COMPUTING
        return transfer_id

    def lease(self, request_id: str) -> float | None:
        """The engine pinned the request's blocks: start the lease and return its expiry.  None when
        an ``Abort`` came first: the blocks are released now and nobody will read them."""
        transfer_id = self.transfer_id(request_id)
        state = self._transfers.get(transfer_id)
        if state is not TransferState.COMPUTING:
            self._release(transfer_id)
            return None
        self._transfers[transfer_id] = TransferState.LEASED
        return self.leases.start(transfer_id)

    def abort(self, request_id: str) -> None:
        """``Abort``: release a leased transfer; one still computing is released when it ends."""
        transfer_id = self.transfer_id(request_id)
        state = self._transfers.get(transfer_id)
        if state is TransferState.COMPUTING:
            self._transfers[transfer_id] = TransferState.ABORTED
        elif state is TransferState.LEASED:
            self._release(transfer_id)

    def settle(self, request_id: str) -> None:
        """The request's stream ended: a transfer that never got leased (failed, aborted, or
        cancelled around the finish, when the engine may have pinned blocks) is released."""
        transfer_id = self.transfer_id(request_id)
        if self._transfers.get(transfer_id) in (TransferState.COMPUTING, TransferState.ABORTED):
            self._release(transfer_id)

    def renew(self, transfer_ids: list[str]) -> dict[str, float]:
        """``RenewLease``: new expiry of each id still leased."""
        return self.leases.renew(transfer_ids)

    def release(self, transfer_id: str) -> None:
        """``ReleaseKV``: the reader is done with a leased transfer."""
        if self._transfers.get(transfer_id) is TransferState.LEASED:
            self._release(transfer_id)

    def expire(self) -> list[str]:
        """Release every transfer whose lease fell due; returns their ids."""
        expired = self.leases.expired()
        for transfer_id in expired:
            log.warning("KV lease %s expired unread; releasing its blocks", transfer_id)
            self._release(transfer_id)
        return expired

    async def run_sweeper(self, interval_s: float) -> None:
        """``expire()`` every ``interval_s`` until cancelled; a failing sweep is logged, not fatal."""
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.expire()
            except Exception:
                log.exception("KV lease sweep failed")

    def release_all(self) -> None:
        """Shutdown: release every transfer still held."""
        for transfer_id in list(self._transfers):
            self._release(transfer_id)

    async def drain(self) -> None:
        """Wait until every unpin handed to the engine ran."""
        await self._unpinning.wait()

    def _release(self, transfer_id: str) -> None:
        """The only path to the engine's unpin: a transfer leaves the table once, and is unpinned then."""
        if self._transfers.pop(transfer_id, None) is None:
            return
        self.leases.end(transfer_id)
        self._unpinning.spawn(self._unpin_logged(transfer_id))

    async def _unpin_logged(self, transfer_id: str) -> None:
        try:
            await self._unpin(transfer_id)
        except Exception as e:  # the engine stopped: nothing is pinned any more
            log.warning("unpinning transfer %s failed: %s", transfer_id, e)
