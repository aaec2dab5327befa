"""Prefill side of the KV handoff: the side channel decode engines call on the KV ROUTER.

``KVSideChannel`` answers ``Handshake`` (refusing a different protocol version,
or a decode that cannot read our KV: ``common.kv_compat.kv_incompatibilities``)
with every rank's KV memory, the transports it can be read over (the
reader's ranks pick one per pair of ranks) and the name of the shared-memory
lease table a same-host reader confirms leases in, and passes ``RenewLease`` and ``ReleaseKV`` to the owner of
the pinned transfers (the prefill handoff) with their sender (``common.bus.server.sender``): only
the transfer's reader may renew or release it, and the side channel never frees blocks itself.  The
reader is ``common.kv_transfer.reader``.
"""

from __future__ import annotations

import logging
from typing import Protocol

from common.bus import BusServer
from common.bus.curve import Peer
from common.bus.server import sender
from common.errors import PeerError
from common.kv_compat import kv_incompatibilities
from common.messages import (
    PROTOCOL_VERSION,
    Ack,
    Fingerprint,
    Handshake,
    HandshakeReply,
    KVRankMemory,
    LeaseRenewed,
    ReleaseKV,
    RenewLease,
)

logger = logging.getLogger(__name__)


class PinnedTransfers(Protocol):
    """What the side channel asks of the owner of the pinned transfers."""

    def renew(self, transfer_ids: list[str], peer: Peer) -> dict[str, float]:
        """New expiry of each id still leased and read by ``peer``; the others are absent."""

    def block_ids(self, transfer_id: str) -> list[int]:
        """The blocks a leased transfer holds."""

    def release(self, transfer_id: str, peer: Peer) -> None:
        """``peer``, the reader, is done: free the transfer's blocks (nothing when released, or not its)."""


class KVSideChannel:
    """Answers handshakes and lease messages on the engine's KV ROUTER."""

    def __init__(
        self,
        engine_id: str,
        fingerprint: Fingerprint,
        ranks: list[KVRankMemory],
        incarnation: str,
        transfers: PinnedTransfers,
        lease_table: str = "",
    ):
        """``ranks``: every rank's KV memory, in rank order; ``incarnation`` names it (``TransportSet``);
        ``lease_table``: the transfers' ``LeaseSlots`` file, for same-host readers ("": none)."""
        self.engine_id = engine_id
        self.fingerprint = fingerprint
        self.transfers = transfers
        self.num_handshakes = 0
        self._reply = HandshakeReply(engine_id, fingerprint, ranks, incarnation, lease_table)

    def attach(self, server: BusServer) -> None:
        server.on(Handshake, self.on_handshake)
        server.on(RenewLease, self.on_renew)
        server.on(ReleaseKV, self.on_release)

    async def on_handshake(self, msg: Handshake) -> HandshakeReply:
        self.num_handshakes += 1
        if msg.protocol_version != PROTOCOL_VERSION:
            raise PeerError(
                "protocol_version", f"peer speaks protocol {msg.protocol_version}, we speak {PROTOCOL_VERSION}"
            )
        reasons = kv_incompatibilities(self.fingerprint, msg.fingerprint)
        if reasons:
            detail = "; ".join(reasons.values())
            logger.warning("refusing KV handshake from %s: %s", msg.engine_id, detail)
            raise PeerError("incompatible", f"decode cannot read our KV: {detail}", ",".join(reasons))
        return self._reply

    async def on_renew(self, msg: RenewLease) -> LeaseRenewed:
        expiry = self.transfers.renew(msg.transfer_ids, sender())
        return LeaseRenewed(expiry, {tid: self.transfers.block_ids(tid) for tid in expiry})

    async def on_release(self, msg: ReleaseKV) -> Ack:
        peer = sender()
        for tid in msg.transfer_ids:
            self.transfers.release(tid, peer)
        return Ack()
