"""Life cycle of a push-mode request in the decode server (``Generate(await_push=True)``), and the one owner
of its pre-allocated blocks.

1. Allocate: the engine gets the request without its first token (``RemoteRequest``) and gives it
   blocks for the prompt plus that token, prefix-cache hits leading, waiting up to
   ``--remote-blocks-timeout-s`` for free ones (``DecodeHandoff.allocate``); with a host tier
   (``--kv-offload-cpu-gib``) the blocks it holds next are loaded from there and count as cached too.
2. Register: a fresh random 128-bit transfer id holds the blocks under a lease of
   ``--kv-push-timeout-s``; the first output carries the ``PushTarget`` (and the prompt's token ids),
   which the gateway hands to a prefill with the prefill leg.
3. Writes: each ``RenewLease`` from a writer confirms the blocks (renewing the lease, answering
   their ids); from then on a write of that writer may be in flight until its next message
   (``RenewLease``, ``PushDone`` or ``ReleaseKV``: it sends none while writing).  Knowing the id is
   what lets a prefill write: a retried prefill leg writes the same blocks again.
4. Settled, once, by the first of: ``PushDone`` (decode from the prefill's first token, as read mode
   does after a read), lease expiry (no prefill finished: the request fails and its blocks are
   freed) or ``Abort``.  An ``Abort`` that comes while a confirmed write may be in flight settles only
   at the writer's next message or the lease's expiry: the blocks are never freed under a write.
   ``ReleaseKV`` (the writer stopped) only ends that in-flight write: another prefill may still finish.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Protocol

from common.bus.curve import Peer
from common.arith import ceil_div
from common.engine.sequence import RemoteAllocation, RemoteRequest, RequestOutput
from common.engine_service import EngineService
from common.errors import PeerError
from common.kv_transfer.leases import LeaseTable
from common.kv_transfer.side_channel import KVSideChannel
from common.messages import Ack, Generate, PushDone, PushTarget, TokenOutput
from common.tasks import BackgroundTasks

log = logging.getLogger(__name__)

ABORTED, EXPIRED = "aborted", "expired"  # how a push settles when no PushDone came


@dataclass(slots=True)
class Slot:
    """One request's pre-allocated blocks, as decode holds them for its writers."""

    request_id: str
    block_ids: list[int]
    settled: asyncio.Future  # PushDone, ABORTED or EXPIRED
    writing: bool = False  # a confirmed write may be in flight
    aborted: bool = False  # an Abort came while writing: settle at the writer's next message
    confirmed_at: float | None = None  # time.monotonic() of the last confirmation
    handed: asyncio.Future | None = None  # after PushDone: the request handed back to the engine


class PushedRequests:
    """Transfer id -> the blocks decode pre-allocated for a push (the side channel's ``PinnedTransfers``)."""

    def __init__(self, leases: LeaseTable):
        self.leases = leases
        self._slots: dict[str, Slot] = {}
        self._by_request: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._slots)

    def open(self, request_id: str, block_ids: list[int]) -> tuple[str, float, Slot]:
        """Hold ``block_ids`` for ``request_id``: its transfer id, lease expiry and slot."""
        transfer_id = secrets.token_hex(16)
        slot = Slot(request_id, list(block_ids), asyncio.get_running_loop().create_future())
        self._slots[transfer_id] = slot
        self._by_request[request_id] = transfer_id
        return transfer_id, self.leases.start(transfer_id), slot

    def holds(self, request_id: str) -> bool:
        return request_id in self._by_request

    def renew(self, transfer_ids: list[str], peer: Peer) -> dict[str, float]:
        """A writer confirms before a write: the new expiry of each id still held (an aborted one settles now:
        the writer's previous write has ended, and it gets no other)."""
        held = []
        for tid in transfer_ids:
            slot = self._slots.get(tid)
            if slot is not None and slot.aborted:
                self._settle(tid, ABORTED)
            elif slot is not None:
                slot.writing, slot.confirmed_at = True, time.monotonic()
                held.append(tid)
        return self.leases.renew(held)

    def block_ids(self, transfer_id: str) -> list[int]:
        slot = self._slots.get(transfer_id)
        return slot.block_ids if slot is not None else []

    def release(self, transfer_id: str, peer: Peer) -> None:
        """``ReleaseKV`` from a writer: its write ended and nothing more comes from it."""
        slot = self._slots.get(transfer_id)
        if slot is not None:
            slot.writing = False
            if slot.aborted:
                self._settle(transfer_id, ABORTED)

    def done(self, msg: PushDone) -> Slot:
        """``PushDone``: every write landed; returns the settled slot.  ``PeerError`` when the blocks are no
        longer held for it."""
        slot = self._slots.get(msg.transfer_id)
        if slot is None or slot.aborted:
            if slot is not None:
                self._settle(msg.transfer_id, ABORTED)
            raise PeerError("kv_transfer_failed", f"push {msg.transfer_id} is not held here (aborted or expired)")
        self._settle(msg.transfer_id, msg)
        return slot

    def abort(self, request_id: str) -> None:
        """Settle the request's push as aborted now, or at its writer's next message when one may be writing."""
        transfer_id = self._by_request.get(request_id)
        if transfer_id is None:
            return
        slot = self._slots[transfer_id]
        if slot.writing:
            slot.aborted = True
        else:
            self._settle(transfer_id, ABORTED)

    def expire(self) -> None:
        """Settle every push whose lease fell due (no writer confirmed it for that long)."""
        for transfer_id in self.leases.expired():
            log.warning("push %s expired: no prefill finished writing its blocks", transfer_id)
            self._settle(transfer_id, EXPIRED)

    async def run_sweeper(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            self.expire()

    def _settle(self, transfer_id: str, outcome: object) -> None:
        slot = self._slots.pop(transfer_id)
        del self._by_request[slot.request_id]
        self.leases.end(transfer_id)
        if not slot.settled.done():
            slot.settled.set_result(outcome)


class DecodeSide(Protocol):
    """What push mode shares with read mode's decode (``DecodeHandoff``): its allocation and token stream."""

    service: EngineService

    async def allocate(self, remote: RemoteRequest) -> RemoteAllocation | None: ...

    def stream_decoded(self, request_id: str, timings: dict[str, float], kv_done: float
                       ) -> AsyncIterator[RequestOutput]: ...


class DecodePush:
    """Serves ``Generate(await_push=True)`` for a ``DecodeHandoff`` (its allocation and token stream)."""

    def __init__(self, handoff: DecodeSide):
        self.handoff = handoff
        self.service = s = handoff.service
        self.pushed = PushedRequests(LeaseTable(s.config.kv_push_timeout_s, max_seconds=s.config.kv_lease_max_seconds))
        self._sweeper: asyncio.Task | None = None
        self._freeing = BackgroundTasks()

    def start(self) -> None:
        """Answer writers on the KV side channel: handshakes, confirmations, ``ReleaseKV``, ``PushDone``."""
        s = self.service
        ranks = [rank.memory for rank in s.kv_ranks]
        side_channel = KVSideChannel(s.instance_id, s.fingerprint, ranks, s.transports.incarnation, self.pushed)
        side_channel.attach(s.kv_server)
        s.kv_server.on(PushDone, self._on_done)
        self._sweeper = asyncio.create_task(self.pushed.run_sweeper(s.config.kv_lease_sweep_interval_s))

    async def _on_done(self, msg: PushDone) -> Ack:
        """The request goes back to the engine here, so that the engine steps without waiting for its leg's
        coroutine to resume (it then streams the tokens)."""
        slot = self.pushed.done(msg)
        slot.handed = self.service.engine.finish_pushed(slot.request_id, msg.first_token_id)
        slot.handed.add_done_callback(lambda f: f.cancelled() or f.exception())  # the leg may be gone: no log
        return Ack()

    async def generate(self, msg: Generate) -> AsyncIterator[TokenOutput]:
        """The registration (first output), then tokens 2... once a prefill pushed the prompt's KV."""
        request_id, s = msg.request_id, self.service
        prompt_ids = s.prompt_token_ids(msg)
        asked = time.monotonic()
        allocation = await self.handoff.allocate(RemoteRequest(request_id, prompt_ids, None, msg.sampling,
                                                               len(prompt_ids)))
        if allocation is None:
            yield TokenOutput(request_id, [], "", finish_reason="abort")
            return
        try:  # its own host tier first (--kv-offload-cpu-gib): prefill writes only what that lacks
            host_blocks = await s.engine.load_from_host(request_id, allocation.num_cached_blocks) \
                if s.core.offload is not None else 0
        except BaseException:
            s.engine.discard(request_id)
            raise
        allocate_s = time.monotonic() - asked
        block_size = s.core.block_size
        prompt_blocks = allocation.block_ids[:ceil_div(len(prompt_ids), block_size)]
        transfer_id, expiry, slot = self.pushed.open(request_id, prompt_blocks)
        target = PushTarget(
            engine_id=s.instance_id, kv_endpoint=s.kv_endpoint, transfer_id=transfer_id, block_ids=prompt_blocks,
            num_tokens=len(prompt_ids), num_cached_tokens=(allocation.num_cached_blocks + host_blocks) * block_size,
            block_size=block_size, lease_expiry=expiry, incarnation=s.transports.incarnation,
            tensor_parallel_size=s.core.tp.world_size,
        )  # fmt: skip
        registered = time.monotonic()
        try:
            yield TokenOutput(request_id, [], "", prompt_token_ids=prompt_ids, push_target=target)
            outcome = await asyncio.shield(slot.settled)  # a cancelled leg must not cancel the slot's future
        except BaseException:
            if not slot.settled.done():  # cancelled: free the blocks once no write may land in them
                self.pushed.abort(request_id)
                self._freeing.spawn(self._free_when_settled(request_id, slot))
            else:  # settled as the leg left (maybe handed back already): nobody streams the request
                s.engine.discard(request_id)
            raise
        if not isinstance(outcome, PushDone):
            await s.engine.abort(request_id)  # no write can land any more: free the blocks
            s.engine.discard(request_id)
            if outcome == EXPIRED:
                raise PeerError("kv_transfer_failed", f"no prefill pushed the prompt's KV within "
                                f"{s.config.kv_push_timeout_s:g} s of its last write")
            yield TokenOutput(request_id, [], "", finish_reason="abort")
            return
        kv_done = time.monotonic()
        try:
            await slot.handed
        except BaseException:
            s.engine.discard(request_id)
            raise
        timings = {"allocate_s": allocate_s, "kv_transfer_s": kv_done - registered,
                   "kv_push_wait_s": kv_done - (slot.confirmed_at or registered)}
        if s.core.offload is not None:  # as read mode stores what it read (``OffloadConnector.store``)
            s.engine.store_to_host(request_id)
            timings["kv_host_blocks"] = float(host_blocks)
        async with aclosing(self.handoff.stream_decoded(request_id, timings, kv_done)) as outputs:
            async for token in s.tokens(request_id, prompt_ids, outputs):
                yield token

    async def _free_when_settled(self, request_id: str, slot: Slot) -> None:
        await slot.settled
        self.service.engine.discard(request_id)

    def abort(self, request_id: str) -> bool:
        """An ``Abort`` for a request awaiting its push; False when none is."""
        if not self.pushed.holds(request_id):
            return False
        self.pushed.abort(request_id)
        return True

    async def shutdown(self) -> None:
        """After the request handlers stopped: wait for the blocks of cancelled pushes to be freed (the sweeper
        settles those no writer speaks for again), then stop the sweeper."""
        await self._freeing.wait(timeout=self.service.config.kv_push_timeout_s)
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
