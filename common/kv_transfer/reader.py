"""Decode side of the KV handoff: ``KVReader`` reads a prompt's blocks from a prefill engine.

``read_blocks(params, local_block_ids, skip_leading)`` handshakes once per
prefill engine (one shared future per engine, failures not cached; the
handshake picks the transport for that engine, see ``transports.py``), maps
token positions to merged byte ranges (``ranges.token_ranges``: whole-block runs
when both engines have the same block size), runs the
blocking backend read in a thread pool, at most ``MAX_RANGES_PER_CALL`` ranges
a call (a started read is never abandoned, even when the caller is cancelled), renews
the lease while it waits, checks every status, confirms the lease still held
after the read, and always sends ``ReleaseKV`` afterwards through a
``ReleaseSender`` (in the background), after the backend stopped touching memory.

The prefill side that answers these calls is ``common.kv_transfer.side_channel``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from common.client_pool import ClientPool
from common.errors import BusError, CallTimeout, HandshakeError, KVTransferError, PeerError
from common.kv_transfer.backend import TransferBackend
from common.kv_transfer.config import KVTransferConfig
from common.kv_transfer.ranges import BlockTable, ByteRanges, KVLayout, token_ranges
from common.kv_transfer.status import RequestTransfers, TransferStatus
from common.kv_transfer.transport_set import TransportSet
from common.kv_transfer.transports import Placement, TransportError, candidates
from common.messages import (
    Fingerprint,
    Handshake,
    HandshakeReply,
    KVTransferParams,
    LeaseRenewed,
    ReleaseKV,
    RenewLease,
    kv_incompatibilities,
)
from common.tasks import BackgroundTasks

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Peer:
    """A prefill engine we completed a handshake with, and the transport we read it over."""

    engine_id: str
    kv_endpoint: str
    transport: str
    backend: TransferBackend
    session: str
    layout: KVLayout
    block_size: int  # tokens per block of the peer's KV (may differ from ours)
    incarnation: str  # the KV memory the handshake described (a restarted prefill has another)


@dataclass(frozen=True)
class ReadStats:
    """One request's read: blocks and merged ranges moved, bytes, seconds inside the backend."""

    num_blocks: int
    num_ranges: int
    bytes: int
    seconds: float


# Most ranges handed to one backend call: Mooncake's TCP transport rejects a batch of a few thousand
# ("TCP lane queue-full"), which a long prompt read between different block sizes easily makes.
MAX_RANGES_PER_CALL = 512


def read_in_batches(backend: TransferBackend, session: str, ranges: ByteRanges) -> list[TransferStatus]:
    """``backend.read`` of ``ranges``, at most ``MAX_RANGES_PER_CALL`` per call, one status per range in
    order; after a call with a failure the rest is not read (FAILED: the read fails anyway)."""
    statuses: list[TransferStatus] = []
    for i in range(0, len(ranges.lengths), MAX_RANGES_PER_CALL):
        window = slice(i, i + MAX_RANGES_PER_CALL)
        batch = backend.read(session, ranges.local_addrs[window], ranges.remote_addrs[window], ranges.lengths[window])
        statuses += batch
        if any(s is not TransferStatus.SUCCESS for s in batch):
            return statuses + [TransferStatus.FAILED] * (len(ranges.lengths) - len(statuses))
    return statuses


def _shards(ranges: ByteRanges, n: int) -> list[ByteRanges]:
    """Split ranges into at most ``n`` batches of about equal byte size, keeping order."""
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


async def _finish_uncancellable(fut: asyncio.Future):
    """Await ``fut`` to completion even if we are cancelled meanwhile; then re-raise the cancel.

    A backend read cannot be stopped once started: returning early would let the
    engine reuse (and the peer free) memory the read is still writing/reading.
    """
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


class ReleaseSender:
    """Sends ``ReleaseKV`` in the background, so a dead prefill never delays the caller; a failed
    send is logged (the lease then expires on the prefill side)."""

    def __init__(self, clients: ClientPool):
        self.clients = clients
        self._sending = BackgroundTasks()

    def send(self, params: KVTransferParams) -> None:
        self._sending.spawn(self._send(params))

    async def flush(self) -> None:
        """Wait until every ``ReleaseKV`` sent so far was answered or failed."""
        await self._sending.wait()

    async def _send(self, params: KVTransferParams) -> None:
        try:
            await self.clients.get(params.kv_endpoint).call(ReleaseKV([params.transfer_id]))
        except BusError as e:
            logger.warning("ReleaseKV %s to %s failed (its lease will expire): %s", params.transfer_id,
                           params.engine_id, e)


class KVReader:
    """Decode side: reads prompt KV blocks from prefill engines."""

    def __init__(
        self,
        transports: TransportSet,
        engine_id: str,
        fingerprint: Fingerprint,
        layout: KVLayout,
        config: KVTransferConfig,
    ):
        self.transports = transports
        self.engine_id = engine_id
        self.fingerprint = fingerprint
        self.layout = layout
        self.config = config
        self._pool = ThreadPoolExecutor(config.kv_transfer_threads, thread_name_prefix="kv-read")
        self._peers: dict[str, asyncio.Future[Peer]] = {}
        self.clients = ClientPool(name=f"kv-{engine_id}", timeout=config.kv_rpc_timeout_s)
        self.releases = ReleaseSender(self.clients)

    # -- handshakes -------------------------------------------------------

    async def handshake(self, engine_id: str, kv_endpoint: str, incarnation: str = "") -> Peer:
        """The peer for ``engine_id``, handshaking once; concurrent callers share one attempt.

        ``incarnation`` (from the transfer params, when given) names the prefill's KV memory: a cached
        peer of another one (the prefill restarted) is handshaken again, because a same-host mapping
        of the old memory would still read, silently, what the dead process left.
        Raises ``HandshakeError``; a failed attempt is forgotten so the next call retries.
        """
        fut = self._peers.get(engine_id)
        if fut is not None and fut.done():
            if (fut.cancelled() or fut.exception() is not None or fut.result().kv_endpoint != kv_endpoint
                    or (incarnation and fut.result().incarnation != incarnation)):
                fut = None  # failed, or the engine moved or restarted: handshake again
        if fut is None:
            fut = asyncio.ensure_future(self._handshake(engine_id, kv_endpoint))
            self._peers[engine_id] = fut
            fut.add_done_callback(lambda f: self._forget_failed(engine_id, f))
        return await asyncio.shield(fut)

    def _forget_failed(self, engine_id: str, fut: asyncio.Future) -> None:
        if (fut.cancelled() or fut.exception() is not None) and self._peers.get(engine_id) is fut:
            del self._peers[engine_id]

    def forget_peer(self, engine_id: str) -> None:
        """Drop a cached handshake (after a failed read): the next request handshakes again."""
        fut = self._peers.get(engine_id)
        if fut is not None and fut.done():
            del self._peers[engine_id]

    async def _handshake(self, engine_id: str, kv_endpoint: str) -> Peer:
        timeout = self.config.kv_handshake_timeout_s
        try:
            reply = await self.clients.get(kv_endpoint).call(Handshake(self.engine_id, self.fingerprint),
                                                             timeout=timeout)
        except CallTimeout:
            self.clients.drop(kv_endpoint)
            raise HandshakeError(f"handshake with {engine_id} at {kv_endpoint} timed out after {timeout:g} s") from None
        except PeerError as e:
            raise HandshakeError(f"{engine_id} refused the handshake: {e.code}: {e.message}") from e
        except BusError as e:
            self.clients.drop(kv_endpoint)
            raise HandshakeError(f"handshake with {engine_id} at {kv_endpoint} failed: {e}") from e
        layout = self._check_reply(engine_id, kv_endpoint, reply)
        return await self._connect(engine_id, kv_endpoint, reply, layout)

    async def _connect(self, engine_id: str, kv_endpoint: str, reply: HandshakeReply, layout: KVLayout) -> Peer:
        """Connect over the first transport that works with this peer (they are tried fastest first)."""
        try:
            order = candidates(self.transports.kv_transport, self.transports.placement,
                               Placement(reply.host_id, reply.memory), list(self.transports.backends),
                               [o.name for o in reply.transports])
        except TransportError as e:
            raise HandshakeError(f"{engine_id}: {e}") from e
        for transport in order[:-1]:
            try:
                return await self._connect_over(transport, engine_id, kv_endpoint, reply, layout)
            except HandshakeError as e:
                logger.warning("%s; trying the next transport", e)
        return await self._connect_over(order[-1], engine_id, kv_endpoint, reply, layout)

    async def _connect_over(self, transport: str, engine_id: str, kv_endpoint: str, reply: HandshakeReply,
                            layout: KVLayout) -> Peer:
        """The peer, read over ``transport``; ``HandshakeError`` when its backend cannot connect."""
        backend = self.transports.backends[transport]
        offer = next(o for o in reply.transports if o.name == transport)
        try:
            await asyncio.get_running_loop().run_in_executor(self._pool, backend.connect, offer.session, offer.meta)
        except Exception as e:  # whatever the backend raises, the request gets a typed error
            raise HandshakeError(f"{transport} cannot connect to {engine_id}: {e}") from e
        if self.transports.chosen.get(engine_id) != transport:
            logger.info("KV from %s (%s) over %s (%s memory on %s, we offer %s, it offers %s)", engine_id, kv_endpoint,
                        transport, reply.memory, reply.host_id, ", ".join(self.transports.backends),
                        ", ".join(o.name for o in reply.transports))
        self.transports.chosen[engine_id] = transport
        return Peer(engine_id, kv_endpoint, transport, backend, offer.session, layout, reply.fingerprint.block_size,
                    reply.incarnation)

    def _check_reply(self, engine_id: str, kv_endpoint: str, reply: object) -> KVLayout:
        if not isinstance(reply, HandshakeReply):
            raise HandshakeError(f"{engine_id} answered the handshake with {type(reply).__name__}")
        if reply.engine_id != engine_id:
            raise HandshakeError(f"{kv_endpoint} is engine {reply.engine_id!r}, not {engine_id!r}")
        reasons = kv_incompatibilities(reply.fingerprint, self.fingerprint)
        if reasons:
            raise HandshakeError(f"{engine_id} has an incompatible KV cache: {'; '.join(reasons.values())}")
        ours, theirs = self.fingerprint.block_size, reply.fingerprint.block_size
        if reply.block_bytes * ours != self.layout.block_bytes * theirs:  # the same bytes per token
            raise HandshakeError(f"{engine_id} has {reply.block_bytes}-byte blocks of {theirs} tokens, "
                                 f"ours are {self.layout.block_bytes} bytes for {ours}")
        if not reply.regions or reply.regions[0].length < reply.block_bytes * reply.num_blocks:
            raise HandshakeError(f"{engine_id}'s registered memory does not hold its {reply.num_blocks} blocks")
        return KVLayout(reply.regions[0].addr, reply.block_bytes, reply.num_blocks)

    # -- reads ------------------------------------------------------------

    async def read_blocks(
        self, params: KVTransferParams, local_block_ids: list[int], skip_leading: int = 0
    ) -> ReadStats:
        """Read the prompt's KV from ``params.block_ids`` into ``local_block_ids`` (our blocks, one per
        ``block_size`` tokens of ``params.num_tokens``), but for the first ``skip_leading`` of ours.

        Those are local prefix-cache hits.  Token positions map between the two block lists
        (``token_ranges``, which needs ``params.num_tokens`` to match both): when the peer's block size
        is ours, that is ``params.block_ids[i]`` into ``local_block_ids[i]``.  Raises
        ``HandshakeError`` / ``KVTransferError``; ``ReleaseKV`` is sent in every
        outcome (success, failure, cancellation) once no backend read is running.
        """
        try:
            same_block_size = params.block_size in (0, self.fingerprint.block_size)
            if same_block_size and len(local_block_ids) != len(params.block_ids):
                raise KVTransferError(
                    f"{len(local_block_ids)} local blocks for {len(params.block_ids)} remote blocks"
                )
            if not 0 <= skip_leading <= len(local_block_ids):
                raise KVTransferError(f"skip_leading={skip_leading} outside [0, {len(local_block_ids)}]")
            peer = await self.handshake(params.engine_id, params.kv_endpoint, params.incarnation)
            if params.incarnation and peer.incarnation != params.incarnation:
                raise KVTransferError(f"transfer {params.transfer_id} is from an earlier run of {params.engine_id}: "
                                      "its blocks are gone")
            if params.block_size not in (0, peer.block_size):
                raise KVTransferError(f"transfer {params.transfer_id} names {params.block_size}-token blocks, "
                                      f"{params.engine_id} has {peer.block_size}")
            try:
                ranges = self._ranges(peer, params, local_block_ids, skip_leading)
            except ValueError as e:
                raise KVTransferError(f"transfer {params.transfer_id}: {e}") from e
            return await self._read(peer, params, ranges, len(local_block_ids) - skip_leading)
        finally:
            self.release(params)

    def _ranges(self, peer: Peer, params: KVTransferParams, local_block_ids: list[int],
                skip_leading: int) -> ByteRanges:
        """The byte ranges of a read: every KV head of the prompt's token positions we lack."""
        num_kv_heads = self.fingerprint.num_kv_heads
        return token_ranges(BlockTable(self.layout, self.fingerprint.block_size, local_block_ids, 0, num_kv_heads),
                            BlockTable(peer.layout, peer.block_size, params.block_ids, 0, num_kv_heads),
                            heads=range(num_kv_heads), num_tokens=params.num_tokens, skip_leading=skip_leading)

    async def _read(self, peer: Peer, params: KVTransferParams, ranges: ByteRanges, num_blocks: int) -> ReadStats:
        if not ranges.lengths:
            return ReadStats(0, 0, 0, 0.0)
        tid = params.transfer_id
        if params.lease_expiry - time.time() < self.config.kv_renew_interval_s:
            try:
                alive = await self._renew(peer, tid)
            except BusError as e:
                raise KVTransferError(f"cannot renew the lease of transfer {tid} before reading: {e}") from e
            if not alive:
                raise KVTransferError(f"lease of transfer {tid} expired before the read")
        lease_lost = asyncio.Event()
        renewer = asyncio.create_task(self._renew_loop(peer, tid, lease_lost))
        shards = _shards(ranges, min(self.config.kv_read_shards or peer.backend.read_shards,
                                     self.config.kv_transfer_threads))
        tracker = RequestTransfers(len(shards))
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            futures = [loop.run_in_executor(self._pool, read_in_batches, peer.backend, peer.session, s)
                       for s in shards]
            results = await _finish_uncancellable(asyncio.gather(*futures, return_exceptions=True))
        finally:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
        seconds = time.perf_counter() - start
        for worker, result in enumerate(results):
            if isinstance(result, BaseException):
                logger.warning("KV read shard %d of %s raised %r", worker, tid, result)
                result = [TransferStatus.FAILED]
            tracker.report(worker, result)
        if tracker.state is not TransferStatus.SUCCESS:
            self.forget_peer(peer.engine_id)
            failed = sum(s is not TransferStatus.SUCCESS for r in results if isinstance(r, list) for s in r)
            raise KVTransferError(
                f"reading transfer {tid} from {peer.engine_id} failed ({failed} of {len(ranges.lengths)} ranges)"
            )
        # The read succeeded only if prefill still held the blocks when it ended: a lease released or
        # expired meanwhile (an abort, a retried decode, a clock far off) means they may hold other KV.
        try:
            held = not lease_lost.is_set() and await self._renew(peer, tid)
        except BusError as e:
            raise KVTransferError(f"cannot confirm the lease of transfer {tid} after the read: {e}") from e
        if not held:
            raise KVTransferError(f"lease of transfer {tid} ended during the read; the blocks may be reused")
        return ReadStats(num_blocks, len(ranges.lengths), ranges.total_bytes, seconds)

    async def _renew(self, peer: Peer, transfer_id: str) -> bool:
        """Renew one lease; False when prefill no longer knows it.  Bus errors propagate."""
        reply = await self.clients.get(peer.kv_endpoint).call(RenewLease([transfer_id]))
        return isinstance(reply, LeaseRenewed) and transfer_id in reply.expiry

    async def _renew_loop(self, peer: Peer, transfer_id: str, lost: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(self.config.kv_renew_interval_s)
            try:
                if not await self._renew(peer, transfer_id):
                    logger.warning("lease of transfer %s is gone at %s", transfer_id, peer.engine_id)
                    lost.set()
                    return
            except BusError as e:
                logger.warning("renewing lease of transfer %s failed: %s", transfer_id, e)

    def release(self, params: KVTransferParams) -> None:
        """Tell prefill it may free ``params``' blocks (in the background)."""
        self.releases.send(params)

    async def close(self) -> None:
        """Wait for pending releases, close clients and the thread pool."""
        await self.releases.flush()
        for fut in self._peers.values():
            fut.cancel()
        self._peers.clear()
        await self.clients.close()
        self._pool.shutdown(wait=True)
