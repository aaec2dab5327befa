"""One tensor-parallel rank's side of a KV read: connect to a peer rank, copy byte ranges into our memory.

Every rank of an instance registers its own KV memory with its own transports
(``TransportSet``) and is described to peers by a ``KVRankMemory``.  Rank 0
drives every read of its instance through one ``RankIO`` per rank:

* ``LocalRankIO``: rank 0's own memory, read in this process (blocking backend
  calls on a thread pool, or inline when the backend copies that much faster than
  a hand-off); a worker rank's agent (``rank_agent.py``) wraps one too;
* ``RemoteRankIO``: a worker rank's memory, read by that rank's agent, asked over the bus.

A started backend read is never abandoned, even when the caller is cancelled:
returning early would let the engine reuse (and the peer free) memory it is still
writing or reading.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import torch

from common.client_pool import ClientPool
from common.errors import BusError
from common.kv_transfer.backend import TransferBackend
from common.kv_transfer.config import KVTransferConfig
from common.kv_transfer.ranges import BlockPairs, ByteRanges, Copy, KVLayout
from common.kv_transfer.status import TransferStatus
from common.kv_transfer.transport_set import TransportSet
from common.messages import KVRankMemory, RankConnect, RankRead, RankReadDone

logger = logging.getLogger(__name__)

# Most ranges handed to one backend call: Mooncake's TCP transport rejects a batch of a few thousand
# ("TCP lane queue-full"), which a long prompt read between different block sizes easily makes.
MAX_RANGES_PER_CALL = 512


def rank_memory(rank: int, heads: tuple[int, int], transports: TransportSet, layout: KVLayout) -> KVRankMemory:
    """How peers see rank ``rank`` holding KV heads ``heads`` = (first, count) in ``layout``."""
    return KVRankMemory(rank=rank, first_head=heads[0], num_heads=heads[1], host_id=transports.placement.host_id,
                        memory=transports.placement.memory, transports=transports.offers(), region=layout.region,
                        block_bytes=layout.block_bytes, num_blocks=layout.num_blocks)  # fmt: skip


def read_in_batches(backend: TransferBackend, session: str, ranges: Copy, write: bool = False
                    ) -> list[TransferStatus]:
    """``backend.read`` (``write``: ``backend.write``) of ``ranges`` (whole blocks: ``backend.copy_blocks``), at
    most ``MAX_RANGES_PER_CALL`` ranges or blocks per call, one status per range or block in order; after a call
    with a failure the rest is not copied (FAILED: the transfer fails anyway)."""
    if isinstance(ranges, BlockPairs):
        def copy(batch: BlockPairs) -> list[TransferStatus]:
            return backend.copy_blocks(session, batch, write=write)
    else:
        def copy(batch: ByteRanges) -> list[TransferStatus]:
            return (backend.write if write else backend.read)(session, *batch)
    if ranges.count <= MAX_RANGES_PER_CALL:  # one call (most reads): no slices
        return copy(ranges)
    statuses: list[TransferStatus] = []
    for i in range(0, ranges.count, MAX_RANGES_PER_CALL):
        batch = copy(ranges.window(i, i + MAX_RANGES_PER_CALL))
        statuses += batch
        if batch.count(TransferStatus.SUCCESS) != len(batch):
            return statuses + [TransferStatus.FAILED] * (ranges.count - len(statuses))
    return statuses


def split_by_bytes(ranges: Copy, n: int) -> list[Copy]:
    """Split ranges (or whole blocks) into at most ``n`` batches of about equal byte size, keeping order."""
    if isinstance(ranges, BlockPairs):
        n = max(1, min(n, ranges.count))
        return [ranges.window(i * ranges.count // n, (i + 1) * ranges.count // n) for i in range(n)]
    n = max(1, min(n, len(ranges.lengths)))
    target = ranges.total_bytes / n
    out: list[ByteRanges] = [ByteRanges([], [], [])]
    size = 0
    for la, ra, length in zip(*ranges):
        if size >= target * len(out) and len(out) < n:
            out.append(ByteRanges([], [], []))
        out[-1].local_addrs.append(la)
        out[-1].remote_addrs.append(ra)
        out[-1].lengths.append(length)
        size += length
    return out


async def finish_uncancellable(fut: asyncio.Future):
    """Await ``fut`` to completion even if we are cancelled meanwhile; then re-raise the cancel."""
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(fut)
            break
        except asyncio.CancelledError:
            if fut.done():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


class RankIO(Protocol):
    """One rank of our instance, as the reader drives it."""

    memory: KVRankMemory

    async def connect(self, transport: str, session: str, meta: bytes) -> None:
        """Prepare to read the peer rank at ``session`` over ``transport``; raises when it cannot."""

    async def read(self, transport: str, session: str, ranges: Copy) -> tuple[list[TransferStatus], float]:
        """Copy ``ranges`` from the peer rank into this rank's memory: one status per range, and the
        seconds spent in the backend.  Never raises for a failed copy (FAILED statuses)."""

    async def write(self, transport: str, session: str, ranges: Copy) -> tuple[list[TransferStatus], float]:
        """Push mode, the mirror of ``read``: copy ``ranges`` of this rank's memory into the peer rank's."""


class LocalRankIO:
    """A rank whose memory this process holds, and the owner of its transports: its backends run on a
    pool of ``--kv-transfer-threads``; a read is split into ``--kv-read-shards`` concurrent batches (0: what
    the transport does best, but no more than this rank's share of the host's cores: the ``tp_size`` ranks
    of an instance read at once, and copy threads beyond the cores only preempt each other)."""

    def __init__(self, memory: KVRankMemory, transports: TransportSet, config: KVTransferConfig, tp_size: int = 1):
        self.memory = memory
        self.transports = transports
        self.threads = config.kv_transfer_threads
        self.read_shards = config.kv_read_shards
        self.cores = max(1, (os.cpu_count() or 1) // tp_size)
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="kv-read")

    @classmethod
    def open(cls, config: KVTransferConfig, rank: int, heads: tuple[int, int], kv: torch.Tensor,
             layout: KVLayout, tp_size: int = 1) -> LocalRankIO:
        """Rank ``rank``'s KV (``kv``, laid out as ``layout``, holding KV heads ``heads`` = (first, count))
        registered with every transport planned for it (``TransportSet.open``: ``TransportError``
        when a forced one cannot work)."""
        transports = TransportSet.open(config, kv, layout.region)
        return cls(rank_memory(rank, heads, transports, layout), transports, config, tp_size)

    async def connect(self, transport: str, session: str, meta: bytes) -> None:
        backend = self.transports.backends[transport]
        await asyncio.get_running_loop().run_in_executor(self.pool, backend.connect, session, meta)

    async def read(self, transport: str, session: str, ranges: Copy) -> tuple[list[TransferStatus], float]:
        return await self._copy(transport, session, ranges, write=False)

    async def write(self, transport: str, session: str, ranges: Copy) -> tuple[list[TransferStatus], float]:
        return await self._copy(transport, session, ranges, write=True)

    async def _copy(self, transport: str, session: str, ranges: Copy, *, write: bool
                    ) -> tuple[list[TransferStatus], float]:
        backend = self.transports.backends[transport]
        start = time.perf_counter()
        if ranges.total_bytes <= backend.inline_bytes:  # faster than the hand-off to a pool thread
            shards = [ranges]
            try:
                results = [read_in_batches(backend, session, ranges, write)]
            except Exception as e:  # noqa: BLE001 - as a pool thread's exception: the ranges count as failed
                results = [e]
        else:
            shards = split_by_bytes(ranges, min(self.read_shards or min(backend.read_shards, self.cores),
                                                self.threads))
            loop = asyncio.get_running_loop()
            futures = [loop.run_in_executor(self.pool, read_in_batches, backend, session, s, write) for s in shards]
            results = await finish_uncancellable(asyncio.gather(*futures, return_exceptions=True))
        seconds = time.perf_counter() - start
        statuses: list[TransferStatus] = []
        for shard, result in zip(shards, results):
            if isinstance(result, BaseException):  # a backend bug: this shard's ranges count as failed
                logger.warning("KV %s of %d ranges with %s raised %r", "write" if write else "read", shard.count,
                               session, result)
                result = [TransferStatus.FAILED] * shard.count
            statuses += result
        return statuses, seconds

    def close(self) -> None:
        """Wait for running backend calls, stop the threads, close the transports."""
        self.pool.shutdown(wait=True)
        self.transports.close()


class RemoteRankIO:
    """A worker rank of our instance: its agent (``rank_agent.RankAgent``) at ``endpoint`` runs the reads."""

    def __init__(self, memory: KVRankMemory, endpoint: str, clients: ClientPool, config: KVTransferConfig):
        self.memory = memory
        self.endpoint = endpoint
        self.clients = clients
        self.connect_timeout_s = config.kv_handshake_timeout_s
        self.read_timeout_s = config.kv_read_timeout_s + config.kv_rpc_timeout_s  # the agent's read, then the reply

    async def connect(self, transport: str, session: str, meta: bytes) -> None:
        await self.clients.get(self.endpoint).call(RankConnect(transport, session, meta),
                                                   timeout=self.connect_timeout_s)

    async def read(self, transport: str, session: str, ranges: Copy) -> tuple[list[TransferStatus], float]:
        """A dead or stuck agent fails every range (after the read timeout, plus the reply's).  Whole blocks
        travel as their byte ranges, a block counting as its range did."""
        return await self._copy(transport, session, ranges, write=False)

    async def write(self, transport: str, session: str, ranges: Copy) -> tuple[list[TransferStatus], float]:
        return await self._copy(transport, session, ranges, write=True)

    async def _copy(self, transport: str, session: str, ranges: Copy, *, write: bool
                    ) -> tuple[list[TransferStatus], float]:
        if isinstance(ranges, BlockPairs):
            byte_ranges, blocks_per_range = ranges.byte_ranges()
            statuses, seconds = await self._copy_ranges(RankRead(transport, session, *byte_ranges, write=write))
            return ranges.block_statuses(statuses, blocks_per_range), seconds
        return await self._copy_ranges(RankRead(transport, session, *ranges, write=write))

    async def _copy_ranges(self, order: RankRead) -> tuple[list[TransferStatus], float]:
        ranges = ByteRanges(order.local_addrs, order.remote_addrs, order.lengths)
        call = asyncio.ensure_future(self.clients.get(self.endpoint).call(order, timeout=self.read_timeout_s))
        try:
            reply = await finish_uncancellable(call)
        except BusError as e:
            logger.warning("KV %s of rank %d (%s) failed: %s", "write" if order.write else "read", self.memory.rank,
                           self.endpoint, e)
            return [TransferStatus.FAILED] * len(ranges.lengths), 0.0
        if not isinstance(reply, RankReadDone):
            logger.warning("rank %d answered a read with %s", self.memory.rank, type(reply).__name__)
            return [TransferStatus.FAILED] * len(ranges.lengths), 0.0
        failed = set(reply.failed)
        return [TransferStatus.FAILED if i in failed else TransferStatus.SUCCESS
                for i in range(len(ranges.lengths))], reply.seconds
