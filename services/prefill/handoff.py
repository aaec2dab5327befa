"""Life cycle of a request in the prefill server, and the one owner of its pinned KV.

1. ``Generate(do_remote_decode)`` arrives from a peer (its owner: only it may
   ``Abort`` the request).  ``begin`` opens the request's transfer (state
   ``COMPUTING``) under a fresh random 128-bit id: nobody can derive it from the
   request id.  The engine computes the prompt and the first token, then pins
   the prompt's blocks under that id instead of freeing them.
2. The final output (finish reason ``remote_decode``) comes back: ``lease`` moves
   the transfer to ``LEASED``, records the pinned block ids, starts its lease and
   takes a slot of the shared-memory lease table (``LeaseSlots``); the reply
   carries the ``KVTransferParams`` the gateway hands to a decode engine.
3. The decode engine handshakes with the side channel, reads the blocks and
   confirms the lease (renewing meanwhile, never past the lease's maximum life):
   over the bus, or, on this host, in the lease table after the copy.
   Its first ``RenewLease`` (or ``ReleaseKV``) claims the transfer: from then on
   both find nothing when another peer sends them (exactly what an unknown id
   gets).  Each renewal answers with the block ids the lease holds, so the
   reader refuses blocks it was not given.  It sends ``ReleaseKV``: ``release``.
4. The transfer is released, exactly once, by the first of:
   ``ReleaseKV`` (``release``), ``Abort`` (``abort``), lease expiry (``expire``),
   an ``Abort`` that raced with the finish (``lease`` after ``abort``), the
   request's stream ending before its finish was leased (cancelled around the
   finish: ``settle``), or shutdown (``release_all``).  Releasing removes the
   transfer, so every later attempt finds nothing: the engine's unpin is called
   from one place (``_release``), once per transfer, right after the transfer's
   lease-table slot changed generation (a same-host reader then fails).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from common.bus.curve import Peer
from common.errors import PeerError
from common.kv_transfer.lease_slots import LeaseSlots
from common.kv_transfer.leases import LeaseTable
from common.tasks import BackgroundTasks

log = logging.getLogger(__name__)

Unpin = Callable[[str], Awaitable[object]]
"""The engine port: give a transfer id's pinned blocks back (nothing pinned under it: no-op)."""


class TransferState(enum.Enum):
    COMPUTING = "computing"  # the engine runs the prompt; it may pin blocks at the finish
    ABORTED = "aborted"  # an Abort came while computing: release instead of leasing
    LEASED = "leased"  # pinned, waiting for the reader under a lease


@dataclass(slots=True)
class Transfer:
    """One request's KV as prefill holds it for a reader."""

    request_id: str
    owner: Peer  # the peer that sent the Generate (``common.bus.server.sender``): only it may Abort
    state: TransferState = TransferState.COMPUTING
    reader: Peer | None = None  # the peer that claimed it: only it may renew or release
    block_ids: list[int] = field(default_factory=list)  # what the lease holds
    slot: int = -1  # its slot in the lease table (-1: none)
    generation: int = 0  # that slot's generation while the lease holds it


def new_transfer_id() -> str:
    """A random 128-bit id (32 hex characters): it cannot be guessed from anything else."""
    return secrets.token_hex(16)


class PrefillHandoff:
    """Transfer id -> every request whose KV prefill holds or may hold for a reader."""

    def __init__(self, engine_id: str, leases: LeaseTable, unpin: Unpin, max_pinned_per_peer: int = 0,
                 slots: LeaseSlots | None = None):
        """``max_pinned_per_peer``: ``begin`` refuses a peer holding this many pinned blocks (0: no cap);
        ``slots``: the lease table same-host readers confirm in (None: they confirm over the bus)."""
        self.engine_id = engine_id
        self.leases = leases
        self.slots = slots
        self.max_pinned_per_peer = max_pinned_per_peer
        self._unpin = unpin
        self._transfers: dict[str, Transfer] = {}
        self._pinned: Counter[bytes] = Counter()  # owner -> blocks its leased transfers hold
        self._by_request: dict[str, str] = {}  # request id -> its open transfer's id
        self._unpinning = BackgroundTasks()

    def __len__(self) -> int:
        """Transfers not yet released."""
        return len(self._transfers)

    def transfer_id(self, request_id: str) -> str | None:
        """The id of the request's open transfer, or None."""
        return self._by_request.get(request_id)

    def begin(self, request_id: str, owner: Peer) -> str:
        """Open the request's transfer for ``owner``; returns its id.  ``PeerError`` while one is still open,
        or (``overloaded``) while ``owner`` holds ``max_pinned_per_peer`` pinned blocks."""
        if request_id in self._by_request:
            raise PeerError("invalid_request", f"request {request_id!r} is already running here", "request_id")
        if 0 < self.max_pinned_per_peer <= self._pinned[owner]:
            raise PeerError("overloaded", f"{self._pinned[owner]} blocks are pinned for this peer already")
        transfer_id = new_transfer_id()
        self._transfers[transfer_id] = Transfer(request_id, owner)
        self._by_request[request_id] = transfer_id
        return transfer_id

    def lease(self, request_id: str, block_ids: list[int]) -> float | None:
        """The engine pinned the request's blocks (``block_ids``): start the lease and return its expiry.
        None when an ``Abort`` came first: the blocks are released now and nobody will read them."""
        transfer = self._open(request_id)
        if transfer is None or transfer.state is not TransferState.COMPUTING:
            self._release(self._by_request.get(request_id))
            return None
        transfer.state, transfer.block_ids = TransferState.LEASED, list(block_ids)
        self._pinned[transfer.owner] += len(block_ids)
        taken = self.slots.take() if self.slots is not None else None
        if taken is not None:
            transfer.slot, transfer.generation = taken
        return self.leases.start(self._by_request[request_id])

    def lease_slot(self, transfer_id: str) -> tuple[int, int]:
        """(slot, generation) of a leased transfer in the lease table; (-1, 0) when it has none."""
        transfer = self._transfers.get(transfer_id)
        return (transfer.slot, transfer.generation) if transfer is not None else (-1, 0)

    def abort(self, request_id: str, peer: Peer) -> None:
        """``Abort`` from ``peer``: release a leased transfer; one still computing is released when it
        ends.  Nothing when ``peer`` did not send the request."""
        transfer = self._open(request_id)
        if transfer is None or transfer.owner != peer:
            return
        if transfer.state is TransferState.COMPUTING:
            transfer.state = TransferState.ABORTED
        elif transfer.state is TransferState.LEASED:
            self._release(self._by_request[request_id])

    def settle(self, request_id: str) -> None:
        """The request's stream ended: a transfer that never got leased (failed, aborted, or
        cancelled around the finish, when the engine may have pinned blocks) is released."""
        transfer = self._open(request_id)
        if transfer is not None and transfer.state in (TransferState.COMPUTING, TransferState.ABORTED):
            self._release(self._by_request[request_id])

    def renew(self, transfer_ids: list[str], peer: Peer) -> dict[str, float]:
        """``RenewLease`` from ``peer``: new expiry of each id leased and claimed by ``peer`` (the first
        to renew or release an id claims it).  The others are absent, as unknown ids are."""
        return self.leases.renew([tid for tid in transfer_ids if self._claim(tid, peer) is not None])

    def block_ids(self, transfer_id: str) -> list[int]:
        """The blocks a leased transfer holds (none for an unknown id)."""
        transfer = self._transfers.get(transfer_id)
        return transfer.block_ids if transfer is not None else []

    def release(self, transfer_id: str, peer: Peer) -> None:
        """``ReleaseKV`` from ``peer``: the reader is done with a leased transfer (nothing for another peer)."""
        if self._claim(transfer_id, peer) is not None:
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

    def _open(self, request_id: str) -> Transfer | None:
        transfer_id = self._by_request.get(request_id)
        return None if transfer_id is None else self._transfers[transfer_id]

    def _claim(self, transfer_id: str, peer: Peer) -> Transfer | None:
        """The leased transfer, bound to ``peer`` if nobody claimed it yet; None when unknown, not
        leased, or claimed by another peer."""
        transfer = self._transfers.get(transfer_id)
        if transfer is None or transfer.state is not TransferState.LEASED or transfer.reader not in (None, peer):
            return None
        transfer.reader = peer
        return transfer

    def _release(self, transfer_id: str | None) -> None:
        """The only path to the engine's unpin: a transfer leaves the table once, and is unpinned then."""
        transfer = self._transfers.pop(transfer_id, None) if transfer_id is not None else None
        if transfer is None:
            return
        del self._by_request[transfer.request_id]
        if transfer.block_ids:
            self._pinned[transfer.owner] -= len(transfer.block_ids)
            if not self._pinned[transfer.owner]:
                del self._pinned[transfer.owner]
        self.leases.end(transfer_id)
        if transfer.slot >= 0:
            self.slots.free(transfer.slot)  # before the blocks go back: a same-host reader sees the release
        self._unpinning.spawn(self._unpin_logged(transfer_id))

    async def _unpin_logged(self, transfer_id: str) -> None:
        try:
            await self._unpin(transfer_id)
        except Exception as e:  # the engine stopped: nothing is pinned any more
            log.warning("unpinning transfer %s failed: %s", transfer_id, e)
