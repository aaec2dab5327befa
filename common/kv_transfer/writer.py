"""Prefill side of push mode: ``KVWriter`` writes a prompt's KV into a decode instance's pre-allocated blocks.

The mirror of ``reader.KVReader``.  ``write(target, start, end, block_ids)`` handshakes
once per decode instance (``peers.PeerDirectory``: its ranks' memory and transports;
a restarted decode, another ``incarnation``, is handshaken again), maps the token
window ``[start, end)`` between our blocks and decode's (``ranges.token_ranges``, any
two block sizes), confirms decode still holds exactly ``target.block_ids`` under its
lease (``RenewLease``: nothing is written otherwise, so a write never lands in blocks
decode freed), then has every rank of ours copy its heads (``rank_io``) and succeeds
only when every rank wrote every range (``status.TransferQuorum``).  ``done`` tells
decode the whole prompt landed (``PushDone``); ``abandon`` tells it nothing more comes
(``ReleaseKV``, in the background).

The decode side that answers is ``services.decode.push``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from common.arith import ceil_div
from common.client_pool import ClientPool
from common.errors import BusError, KVTransferError
from common.kv_transfer.config import KVTransferConfig
from common.kv_transfer.peers import Peer, PeerDirectory
from common.kv_transfer.rank_io import RankIO, finish_uncancellable
from common.kv_transfer.read_plan import table_of
from common.kv_transfer.reader import ReleaseSender, check_held
from common.kv_transfer.ranges import ByteRanges, token_ranges
from common.kv_transfer.status import TransferQuorum, TransferStatus
from common.messages import Fingerprint, LeaseRenewed, PushDone, PushTarget, RenewLease

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WriteStats:
    """One window's write over all ranks: merged ranges, bytes, seconds of the backend copies."""

    num_ranges: int
    bytes: int
    seconds: float


@dataclass(frozen=True)
class PlannedWrite:
    rank: int  # ours
    peer_rank: int  # decode's
    ranges: ByteRanges


class KVWriter:
    """Our ranks (``ranks``, rank order) write prompt KV into decode instances' blocks."""

    def __init__(self, ranks: list[RankIO], engine_id: str, fingerprint: Fingerprint, config: KVTransferConfig,
                 chosen: dict[str, str]):
        """``chosen`` (decode id -> the transports we write it over) is kept up to date for stats."""
        self.ranks = ranks
        self.fingerprint = fingerprint
        self.clients = ClientPool(name=f"kv-push-{engine_id}", timeout=config.kv_rpc_timeout_s)
        self.peers = PeerDirectory(ranks, engine_id, fingerprint, config.kv_transport, self.clients,
                                   config.kv_handshake_timeout_s, chosen, writes=True)
        self.releases = ReleaseSender(self.clients)

    async def write(self, target: PushTarget, start: int, end: int, block_ids: list[int]) -> WriteStats:
        """Write the KV of prompt tokens ``[start, end)`` from our blocks ``block_ids`` (the sequence's block
        table) into ``target``'s blocks; tokens decode holds already (``num_cached_tokens``) are skipped.
        Raises ``HandshakeError`` / ``KVTransferError`` (``KVBlocksRefused`` when decode's lease holds other
        blocks); nothing is written unless decode confirmed its blocks first."""
        start = max(start, target.num_cached_tokens)
        if start >= end:
            return WriteStats(0, 0, 0.0)
        peer = await self.peers.peer(target.engine_id, target.kv_endpoint, target.incarnation)
        if target.incarnation and peer.incarnation != target.incarnation:
            raise KVTransferError(f"push {target.transfer_id} names an earlier run of {target.engine_id}")
        if target.block_size != peer.block_size or target.tensor_parallel_size != len(peer.ranks):
            raise KVTransferError(f"push {target.transfer_id} names {target.block_size}-token blocks and TP "
                                  f"{target.tensor_parallel_size}, {target.engine_id} has {peer.block_size} and "
                                  f"{len(peer.ranks)}")
        try:
            writes = self._plan(peer, target, start, end, block_ids)
        except ValueError as e:
            raise KVTransferError(f"push {target.transfer_id}: {e}") from e
        try:
            held = await self._confirm(target)
        except BusError as e:
            raise KVTransferError(f"cannot confirm push {target.transfer_id} with {target.engine_id}: {e}") from e
        check_held(target, held, "before the write; nothing was written")
        began = time.perf_counter()
        results = await finish_uncancellable(asyncio.gather(*(self._write_one(peer, w) for w in writes)))
        seconds = time.perf_counter() - began
        quorum = TransferQuorum(len(self.ranks))
        for rank in range(len(self.ranks)):
            quorum.report(rank, [s for w, statuses in zip(writes, results) if w.rank == rank for s in statuses])
        num_ranges = sum(len(w.ranges.lengths) for w in writes)
        if quorum.state is not TransferStatus.SUCCESS:
            self.peers.forget(peer.engine_id)
            raise KVTransferError(f"writing push {target.transfer_id} to {target.engine_id} failed")
        return WriteStats(num_ranges, sum(w.ranges.total_bytes for w in writes), seconds)

    def done(self, target: PushTarget, first_token_id: int) -> asyncio.Future:
        """Tell decode every write landed: ``PushDone`` is queued before this returns (``BusClient.ask``; it leaves
        with the event loop's next turn, as a reply queued now does).  The future: decode's answer; ``BusError`` when
        it does not answer, ``PeerError`` when it no longer holds the blocks (raised here when the client is
        closed)."""
        return self.clients.get(target.kv_endpoint).ask(PushDone(target.transfer_id, first_token_id),
                                                         f"PushDone of {target.transfer_id}")

    def abandon(self, target: PushTarget) -> None:
        """Tell decode (in the background) that nothing more will be written for ``target``."""
        self.releases.send(target)

    async def close(self) -> None:
        await self.releases.flush()
        self.peers.close()
        await self.clients.close()

    def _plan(self, peer: Peer, target: PushTarget, start: int, end: int, block_ids: list[int]
              ) -> list[PlannedWrite]:
        """Every (our rank, decode rank) write of the window; ``ValueError`` when the block lists do not fit.
        Each of our ranks writes the heads it shares with the decode ranks that hold them."""
        ours_bs = self.fingerprint.block_size
        theirs = target.block_ids[:ceil_div(end, peer.block_size)]
        writes = []
        for ours, sources in enumerate(peer.sources):
            local = table_of(self.ranks[ours].memory, ours_bs, block_ids[:ceil_div(end, ours_bs)])
            for source in sources:
                remote = table_of(peer.ranks[source.rank], peer.block_size, theirs)
                ranges = token_ranges(local, remote, heads=source.heads, num_tokens=end, first_token=start)
                if ranges.lengths:
                    writes.append(PlannedWrite(ours, source.rank, ranges))
        return writes

    async def _write_one(self, peer: Peer, write: PlannedWrite) -> list[TransferStatus]:
        link = peer.links[(write.rank, write.peer_rank)]
        statuses, _ = await self.ranks[write.rank].write(link.transport, link.session, write.ranges)
        return statuses

    async def _confirm(self, target: PushTarget) -> list[int] | None:
        """Renew decode's lease of the blocks: the block ids it holds, or None when it holds none any more."""
        reply = await self.clients.get(target.kv_endpoint).call(RenewLease([target.transfer_id]))
        if not isinstance(reply, LeaseRenewed) or target.transfer_id not in reply.expiry:
            return None
        return reply.block_ids.get(target.transfer_id, [])
