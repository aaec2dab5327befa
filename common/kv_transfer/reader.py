"""Decode side of the KV handoff: ``KVReader`` reads a prompt's KV from a prefill instance.

``read_blocks(params, local_block_ids, skip_leading)`` handshakes once per
prefill instance (``peers.PeerDirectory``: which prefill rank each of our ranks
reads each of its heads from, and over which transport), plans what every (our
rank, source) pair copies (``ranges.whole_blocks``: two lists of block ids when
both sides have the same block size and heads; else ``ranges.token_ranges``: token
positions mapped into byte ranges), has every rank of ours copy them (``rank_io``:
rank 0 in this process, the others through their agents), renews the lease while
they run, completes the read only when EVERY rank reported success for EVERY range
or block (one status each, each counted), confirms the lease still held after the read, and
always sends ``ReleaseKV`` afterwards through a ``ReleaseSender`` (in the
background), after no rank touches memory any more.

Every ``RenewLease`` (the first one claims the transfer: the prefill answers
no other peer for it) answers with the block ids the lease holds; the read
fails with ``KVBlocksRefused`` unless they are exactly the params' block ids
(other blocks would be another prompt's KV): the caller must not use what was read.

The confirmation after the read is a ``RenewLease`` round trip, except from a
same-host prefill with a lease table (``peers.Peer.leases``) and a slot in the
params: there the claim (``claim``, which the caller may start before it even
has blocks to read into) runs alongside the copy, and once both are done the
lease is confirmed locally, by the slot's generation (``lease_slots``).

The prefill side that answers these calls is ``common.kv_transfer.side_channel``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from common.bus import BusClient
from common.client_pool import ClientPool
from common.errors import BusError, CallTimeout, KVBlocksRefused, KVTransferError, PeerGone
from common.kv_transfer.config import KVTransferConfig
from common.kv_transfer.peers import Peer, PeerDirectory
from common.kv_transfer.rank_io import RankIO, finish_uncancellable
from common.kv_transfer.ranges import Copy, token_ranges, whole_blocks
from common.kv_transfer.read_plan import Source, table_of
from common.kv_transfer.status import TransferStatus
from common.messages import Fingerprint, KVTransferParams, LeaseRenewed, PushTarget, ReleaseKV, RenewLease

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadStats:
    """One request's read: blocks, and ranges copied (one status each: a merged range, or a whole block when the
    read was planned as whole blocks), over all ranks; bytes, seconds of the read."""

    num_blocks: int
    num_ranges: int
    bytes: int
    seconds: float


@dataclass(frozen=True)
class PlannedRead:
    """What one of our ranks copies from one prefill rank for a request."""

    rank: int  # ours
    source: Source
    ranges: Copy  # whole blocks when both sides have one block size and the same heads


class ReleaseSender:
    """Sends ``ReleaseKV`` in the background (push mode: from prefill to decode), so a dead peer never delays
    the caller; a failed send is logged (the lease then expires on the peer's side), and a peer that did not answer
    or left loses its pooled client (no socket stays behind dialing a dead endpoint).  A release is a callback that
    queues a request on the client (``BusClient.ask``), not a task: it costs the caller a few microseconds."""

    def __init__(self, clients: ClientPool):
        self.clients = clients
        self._sending: set[asyncio.Future] = set()

    def send(self, params: KVTransferParams | PushTarget) -> None:
        """Queue the release; it leaves with the event loop's next turn (the caller's next step goes first)."""
        loop = asyncio.get_running_loop()
        sent = loop.create_future()  # done once answered or failed
        self._sending.add(sent)
        sent.add_done_callback(self._sending.discard)
        loop.call_soon(self._send, params, sent)

    def _send(self, params: KVTransferParams | PushTarget, sent: asyncio.Future) -> None:
        client = None
        try:
            client = self.clients.get(params.kv_endpoint)
            answer = client.ask(ReleaseKV([params.transfer_id]), f"ReleaseKV of {params.transfer_id}")
        except BusError as e:
            self._failed(params, client, e)
            sent.set_result(None)
            return
        answer.add_done_callback(lambda _: self._done(params, client, answer, sent))

    async def flush(self) -> None:
        """Wait until every ``ReleaseKV`` sent so far was answered or failed."""
        if self._sending:
            await asyncio.wait(list(self._sending))

    def _done(self, params: KVTransferParams | PushTarget, client: BusClient, answer: asyncio.Future,
              sent: asyncio.Future) -> None:
        if not answer.cancelled() and answer.exception() is not None:
            self._failed(params, client, answer.exception())
        sent.set_result(None)

    def _failed(self, params: KVTransferParams | PushTarget, client: BusClient | None, e: BusError) -> None:
        if isinstance(e, (CallTimeout, PeerGone)):
            self.clients.drop(params.kv_endpoint, client)
        logger.warning("ReleaseKV %s to %s failed (its lease will expire): %s", params.transfer_id,
                       params.engine_id, e)


class KVReader:
    """Decode side: our ranks (``ranks``, rank order) read prompt KV from prefill instances."""

    def __init__(self, ranks: list[RankIO], engine_id: str, fingerprint: Fingerprint, config: KVTransferConfig,
                 chosen: dict[str, str]):
        """``chosen`` (prefill id -> the transports we read it over) is kept up to date for stats."""
        self.ranks = ranks
        self.fingerprint = fingerprint
        self.config = config
        self.clients = ClientPool(name=f"kv-{engine_id}", timeout=config.kv_rpc_timeout_s)
        self.peers = PeerDirectory(ranks, engine_id, fingerprint, config.kv_transport, self.clients,
                                   config.kv_handshake_timeout_s, chosen)
        self.releases = ReleaseSender(self.clients)
        self._claims: dict[str, asyncio.Future[list[int] | None]] = {}  # transfer id -> its first RenewLease

    def claim(self, params: KVTransferParams) -> asyncio.Future[list[int] | None]:
        """Claim ``params``' transfer now (its first ``RenewLease``), so that a read from a same-host prefill
        does not wait for the round trip; ``read_blocks`` or ``release`` consumes it.  The request is queued
        before this returns and leaves with the event loop's next turn: a caller about to do work that may
        not yield (an idle engine's allocation, an inline read) yields once first (``asyncio.sleep(0)``).
        Returns the claim (awaiting it is optional: the block ids its lease holds, or None; ``BusError``)."""
        if params.transfer_id not in self._claims:
            self._claims[params.transfer_id] = self._renew(params.kv_endpoint, params.transfer_id)
        return self._claims[params.transfer_id]

    def _renew(self, kv_endpoint: str, transfer_id: str) -> asyncio.Future[list[int] | None]:
        """Renew one lease (claiming it), the request queued on the client before this returns (``BusClient.ask``).
        The future: the block ids the lease holds, or None when prefill no longer knows it (or it is another
        reader's); bus errors (``CallTimeout`` after the client's timeout)."""
        def held(reply: object) -> list[int] | None:
            if not isinstance(reply, LeaseRenewed) or transfer_id not in reply.expiry:
                return None
            return reply.block_ids.get(transfer_id, [])

        try:
            return self.clients.get(kv_endpoint).ask(RenewLease([transfer_id]), f"RenewLease of {transfer_id}", held)
        except BusError as e:
            failed = asyncio.get_running_loop().create_future()
            failed.set_exception(e)
            return failed

    async def read_blocks(
        self, params: KVTransferParams, local_block_ids: list[int], skip_leading: int = 0
    ) -> ReadStats:
        """Read the prompt's KV from ``params.block_ids`` into ``local_block_ids`` (our blocks, one per
        ``block_size`` tokens of ``params.num_tokens``), but for the first ``skip_leading`` of ours.

        Those are local prefix-cache hits.  Token positions map between the two sides' blocks
        (whatever their block sizes) and every rank of ours reads the heads it owns.  Raises
        ``HandshakeError`` / ``KVTransferError``; ``ReleaseKV`` is sent in every outcome (success,
        failure, cancellation) once no backend read is running.
        """
        try:
            if not 0 <= skip_leading <= len(local_block_ids):
                raise KVTransferError(f"skip_leading={skip_leading} outside [0, {len(local_block_ids)}]")
            peer = await self.peers.peer(params.engine_id, params.kv_endpoint, params.incarnation)
            if params.incarnation and peer.incarnation != params.incarnation:
                raise KVTransferError(f"transfer {params.transfer_id} is from an earlier run of {params.engine_id}: "
                                      "its blocks are gone")
            if params.block_size not in (0, peer.block_size):
                raise KVTransferError(f"transfer {params.transfer_id} names {params.block_size}-token blocks, "
                                      f"{params.engine_id} has {peer.block_size}")
            if params.tensor_parallel_size != len(peer.ranks):
                raise KVTransferError(f"transfer {params.transfer_id} names prefill TP {params.tensor_parallel_size}, "
                                      f"{params.engine_id} has {len(peer.ranks)} ranks")
            try:
                reads = self._plan(peer, params, local_block_ids, skip_leading)
            except ValueError as e:
                raise KVTransferError(f"transfer {params.transfer_id}: {e}") from e
            return await self._read(peer, params, reads, len(local_block_ids) - skip_leading)
        finally:
            self.release(params)

    def _plan(self, peer: Peer, params: KVTransferParams, local_block_ids: list[int], skip_leading: int
              ) -> list[PlannedRead]:
        """Every (our rank, source) read of the request; ``ValueError`` when the block lists do not fit."""
        reads = []
        remote = [table_of(rank, peer.block_size, params.block_ids) for rank in peer.ranks]  # one per prefill rank
        for ours, sources in enumerate(peer.sources):
            local = table_of(self.ranks[ours].memory, self.fingerprint.block_size, local_block_ids)
            for source in sources:
                span = dict(heads=source.heads, num_tokens=params.num_tokens, skip_leading=skip_leading)
                ranges = whole_blocks(local, remote[source.rank], **span)
                if ranges is None:
                    ranges = token_ranges(local, remote[source.rank], **span)
                if ranges.count:
                    reads.append(PlannedRead(ours, source, ranges))
        return reads

    async def _read(self, peer: Peer, params: KVTransferParams, reads: list[PlannedRead], num_blocks: int) -> ReadStats:
        if not reads:
            return ReadStats(0, 0, 0, 0.0)
        tid = params.transfer_id
        local = peer.leases is not None and params.lease_slot >= 0  # confirmed in the lease table
        if local:
            claim = self.claim(params)
            del self._claims[tid]
            claim.add_done_callback(_consume)  # its outcome is not needed when the read fails first
        if params.lease_expiry - time.time() < self.config.kv_renew_interval_s:
            try:
                held = await self._renew(peer.kv_endpoint, tid)
            except BusError as e:
                raise KVTransferError(f"cannot renew the lease of transfer {tid} before reading: {e}") from e
            check_held(params, held, "before the read")
        lease_lost = asyncio.Event()
        renewer: list[asyncio.Task] = []  # started only by a read outlasting the renew interval (a timer is cheaper)
        timer = asyncio.get_running_loop().call_later(
            self.config.kv_renew_interval_s,
            lambda: renewer.append(asyncio.create_task(self._renew_loop(peer, tid, lease_lost))))
        start = time.perf_counter()
        try:
            if len(reads) == 1:  # no task: the copy starts before the loop runs anything else (the claim's send)
                results = [await self._read_one(peer, reads[0])]  # a RankIO read finishes even when cancelled
            else:
                results = await finish_uncancellable(asyncio.gather(*(self._read_one(peer, r) for r in reads)))
        finally:
            timer.cancel()
            if renewer:
                renewer[0].cancel()
                await asyncio.gather(*renewer, return_exceptions=True)
        seconds = time.perf_counter() - start
        num_ranges = sum(r.ranges.count for r in reads)
        # Every rank's every read reported every range (a short list counts its missing ranges as failed).
        failed = num_ranges - sum(statuses.count(TransferStatus.SUCCESS) for statuses in results)
        if failed:
            self.peers.forget(peer.engine_id)
            raise KVTransferError(f"reading transfer {tid} from {peer.engine_id} failed ({failed} of {num_ranges} "
                                  "ranges)")
        # The read succeeded only if prefill still held the blocks when it ended: a lease released or
        # expired meanwhile (an abort, a retried decode, a clock far off) means they may hold other KV.
        try:
            held = None if lease_lost.is_set() else await (claim if local else self._renew(peer.kv_endpoint, tid))
        except BusError as e:
            raise KVTransferError(f"cannot confirm the lease of transfer {tid} after the read: {e}") from e
        if local and not peer.leases.held(params.lease_slot, params.lease_generation):
            held = None  # released after the claim, before the copy ended
        check_held(params, held, "during the read; the blocks may be reused")
        return ReadStats(num_blocks, num_ranges, sum(r.ranges.total_bytes for r in reads), seconds)

    async def _read_one(self, peer: Peer, read: PlannedRead) -> list[TransferStatus]:
        link = peer.links[(read.rank, read.source.rank)]
        statuses, _ = await self.ranks[read.rank].read(link.transport, link.session, read.ranges)
        return statuses

    async def _renew_loop(self, peer: Peer, transfer_id: str, lost: asyncio.Event) -> None:
        """Renew now, then every renew interval, until the lease is gone (``lost``) or cancelled."""
        while True:
            try:
                if await self._renew(peer.kv_endpoint, transfer_id) is None:
                    logger.warning("lease of transfer %s is gone at %s", transfer_id, peer.engine_id)
                    lost.set()
                    return
            except BusError as e:
                logger.warning("renewing lease of transfer %s failed: %s", transfer_id, e)
            await asyncio.sleep(self.config.kv_renew_interval_s)

    def release(self, params: KVTransferParams) -> None:
        """Tell prefill it may free ``params``' blocks (in the background); a claim nobody used is dropped."""
        claim = self._claims.pop(params.transfer_id, None)
        if claim is not None:
            claim.add_done_callback(_consume)
        self.releases.send(params)

    async def close(self) -> None:
        """Wait for pending releases, forget handshakes, close clients (the ranks are closed by their owner)."""
        await self.releases.flush()
        self.peers.close()
        await self.clients.close()


def _consume(claim: asyncio.Future) -> None:
    """Retrieve a claim's outcome, so that one nobody awaits (the read failed, or never ran) logs nothing."""
    if not claim.cancelled():
        claim.exception()


def check_held(params: KVTransferParams | PushTarget, held: list[int] | None, when: str) -> None:
    """``KVTransferError`` unless the lease was held ``when``; ``KVBlocksRefused`` unless it holds exactly
    ``params.block_ids`` (other blocks would be another prompt's KV).  Push mode checks decode's lease so."""
    if held is None:
        raise KVTransferError(f"lease of transfer {params.transfer_id} ended {when}")
    if held != params.block_ids:
        raise KVBlocksRefused(f"transfer {params.transfer_id} names {len(params.block_ids)} blocks that are not "
                              f"the {len(held)} its lease holds: refused")
