"""Decode side of the handshake: the prefill instances our ranks read from, and how each rank reaches them
(push mode, prefill side: the decode instances our ranks write into, ``writes=True``).

``PeerDirectory.peer(engine_id, kv_endpoint, incarnation)`` handshakes once per
prefill instance (one shared future per instance, failures not cached), checks
that we can read its KV, plans which prefill rank each of our ranks reads each
of its heads from (``read_plan.plan_sources``), and connects every such pair of
ranks over the fastest transport both serve (``transports.candidates``; a
transport that cannot connect falls through to the next).  The handshake is done
only when every pair is connected.  A prefill whose every pair is linked over a
same-host transport and that names a lease table gets it mapped
(``lease_slots.LeaseSlotsView``): its leases are confirmed there after a read.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from common.client_pool import ClientPool
from common.errors import BusError, CallTimeout, HandshakeError, PeerError
from common.kv_transfer.lease_slots import LeaseSlotsView
from common.kv_transfer.rank_io import RankIO
from common.kv_transfer.read_plan import Source, plan_sources, plan_targets
from common.kv_transfer.transports import SAME_HOST, Placement, TransportError, candidates
from common.kv_compat import kv_incompatibilities
from common.messages import Fingerprint, Handshake, HandshakeReply, KVRankMemory

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Link:
    """How one of our ranks reads one prefill rank: the transport, and the peer rank's session on it."""

    transport: str
    session: str


@dataclass(frozen=True)
class Peer:
    """A prefill instance we completed a handshake with."""

    engine_id: str
    kv_endpoint: str
    ranks: list[KVRankMemory]  # its ranks' KV memory, in rank order
    sources: list[list[Source]]  # per rank of ours: where it reads its heads from (push mode: what it writes where)
    links: dict[tuple[int, int], Link]  # (our rank, its rank) -> how
    block_size: int  # tokens per block of its KV (may differ from ours)
    incarnation: str  # the KV memory the handshake described (a restarted prefill has another)
    leases: LeaseSlotsView | None = None  # its lease table, when every link is same-host (unmapped with the Peer)


class PeerDirectory:
    """Handshakes of our instance (``ranks``: one ``RankIO`` per rank of ours) with prefill instances."""

    def __init__(self, ranks: list[RankIO], engine_id: str, fingerprint: Fingerprint, kv_transport: str,
                 clients: ClientPool, handshake_timeout_s: float, chosen: dict[str, str], writes: bool = False):
        """``chosen`` (prefill id -> the transports our ranks read it over) is kept up to date for stats;
        ``writes``: push mode, our ranks write into the peers (decode instances) instead."""
        self.ranks = ranks
        self.engine_id = engine_id
        self.fingerprint = fingerprint
        self.kv_transport = kv_transport
        self.clients = clients
        self.handshake_timeout_s = handshake_timeout_s
        self.chosen = chosen
        self.writes = writes
        self._peers: dict[str, asyncio.Future[Peer]] = {}

    async def peer(self, engine_id: str, kv_endpoint: str, incarnation: str = "") -> Peer:
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

    def forget(self, engine_id: str) -> None:
        """Drop a cached handshake (after a failed read): the next request handshakes again."""
        fut = self._peers.get(engine_id)
        if fut is not None and fut.done():
            del self._peers[engine_id]

    def close(self) -> None:
        for fut in self._peers.values():
            fut.cancel()
        self._peers.clear()

    async def _handshake(self, engine_id: str, kv_endpoint: str) -> Peer:
        timeout = self.handshake_timeout_s
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
        self._check_reply(engine_id, kv_endpoint, reply)
        try:
            ours = [rank.memory for rank in self.ranks]
            sources = plan_targets(ours, reply.ranks) if self.writes else [plan_sources(m, reply.ranks) for m in ours]
        except ValueError as e:
            raise HandshakeError(f"{engine_id}: {e}") from e
        pairs = sorted({(ours, source.rank) for ours, rank_sources in enumerate(sources) for source in rank_sources})
        links = await asyncio.gather(*(self._connect(engine_id, self.ranks[ours], reply.ranks[theirs])
                                       for ours, theirs in pairs))
        chosen = ",".join(sorted({link.transport for link in links}))
        if self.chosen.get(engine_id) != chosen:
            logger.info("KV %s %s (%s, TP %d) over %s", "to" if self.writes else "from", engine_id, kv_endpoint,
                        len(reply.ranks), chosen)
        self.chosen[engine_id] = chosen
        same_host = all(link.transport in SAME_HOST.values() for link in links)
        return Peer(engine_id, kv_endpoint, reply.ranks, sources, dict(zip(pairs, links)),
                    reply.fingerprint.block_size, reply.incarnation,
                    self._lease_table(engine_id, reply.lease_table) if same_host and not self.writes else None)

    def _lease_table(self, engine_id: str, name: str) -> LeaseSlotsView | None:
        """The same-host peer's lease table, or None (none named, or it cannot be mapped: the bus confirms)."""
        if not name:
            return None
        try:
            return LeaseSlotsView(name)
        except (OSError, ValueError) as e:
            logger.warning("%s's lease table %r cannot be mapped, leases are confirmed over the bus: %s",
                           engine_id, name, e)
            return None

    async def _connect(self, engine_id: str, ours: RankIO, theirs: KVRankMemory) -> Link:
        """Connect our rank to theirs over the first transport that works (they are tried fastest first)."""
        mine = ours.memory
        try:
            order = candidates(self.kv_transport, Placement(mine.host_id, mine.memory),
                               Placement(theirs.host_id, theirs.memory), [o.name for o in mine.transports],
                               [o.name for o in theirs.transports])
        except TransportError as e:
            raise HandshakeError(f"{engine_id} rank {theirs.rank}: {e}") from e
        for transport in order:
            offer = next(o for o in theirs.transports if o.name == transport)
            try:
                await ours.connect(transport, offer.session, offer.meta)
                return Link(transport, offer.session)
            except Exception as e:  # whatever the backend raises, the request gets a typed error
                failure = HandshakeError(f"{transport} cannot connect our rank {mine.rank} to {engine_id} rank "
                                         f"{theirs.rank}: {e}")
                if transport != order[-1]:
                    logger.warning("%s; trying the next transport", failure)
        raise failure

    def _check_reply(self, engine_id: str, kv_endpoint: str, reply: object) -> None:
        if not isinstance(reply, HandshakeReply):
            raise HandshakeError(f"{engine_id} answered the handshake with {type(reply).__name__}")
        if reply.engine_id != engine_id:
            raise HandshakeError(f"{kv_endpoint} is engine {reply.engine_id!r}, not {engine_id!r}")
        reasons = kv_incompatibilities(reply.fingerprint, self.fingerprint)
        if reasons:
            raise HandshakeError(f"{engine_id} has an incompatible KV cache: {'; '.join(reasons.values())}")
        if [r.rank for r in reply.ranks] != list(range(reply.fingerprint.tensor_parallel_size)):
            raise HandshakeError(f"{engine_id} describes ranks {[r.rank for r in reply.ranks]} for TP "
                                 f"{reply.fingerprint.tensor_parallel_size}")
        mine = self.ranks[0].memory
        ours = mine.block_bytes // (mine.num_heads * self.fingerprint.block_size)  # bytes per token and head
        for rank in reply.ranks:
            token_heads = rank.num_heads * reply.fingerprint.block_size
            if token_heads <= 0 or rank.block_bytes != ours * token_heads:
                raise HandshakeError(f"{engine_id} rank {rank.rank} has {rank.block_bytes}-byte blocks of "
                                     f"{reply.fingerprint.block_size} tokens and {rank.num_heads} heads, ours hold "
                                     f"{ours} bytes per token and head")
            if rank.region.length < rank.block_bytes * rank.num_blocks:
                raise HandshakeError(f"{engine_id} rank {rank.rank}'s registered memory does not hold its "
                                     f"{rank.num_blocks} blocks")
