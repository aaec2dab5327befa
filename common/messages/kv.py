"""KV side channel messages (decode -> prefill: handshake, leases, push) and a tensor-parallel instance's rank agent's."""

from __future__ import annotations

import msgspec

from common.messages.base import Fingerprint, Message, PROTOCOL_VERSION


class MemoryRegion(msgspec.Struct, frozen=True):
    addr: int
    length: int


class Handshake(Message):
    engine_id: str
    fingerprint: Fingerprint
    protocol_version: int = PROTOCOL_VERSION


class TransportOffer(msgspec.Struct, frozen=True):
    """One way to read an engine's KV: ``name`` is ``nvlink``, ``shm``, ``rdma`` or ``tcp``."""

    name: str
    backend: str  # the backend serving it: "mooncake", "mori", "shm", "nvlink"
    session: str  # the backend's address for this engine (Mooncake session name...)
    meta: bytes = b""  # backend-specific opaque blob (MoRI engine descriptor, shared-memory file...)


class KVRankMemory(msgspec.Struct, frozen=True):
    """One tensor-parallel rank's KV cache as a reader addresses it: the KV heads it holds, where
    its blocks live, and the transports it is served over (each rank registers its own memory)."""

    rank: int
    first_head: int  # global index of its first KV head
    num_heads: int  # KV heads it holds: [first_head, first_head + num_heads)
    host_id: str  # hostname + boot id: equal ids can share memory
    memory: str  # where the KV lives: "cpu" or "cuda"
    transports: list[TransportOffer]  # what this rank serves, fastest first
    region: MemoryRegion  # its registered KV memory
    block_bytes: int  # bytes of one block (its heads, all layers, K and V)
    num_blocks: int


class HandshakeReply(Message):
    engine_id: str
    fingerprint: Fingerprint
    ranks: list[KVRankMemory]  # one per tensor-parallel rank, in rank order
    incarnation: str = ""  # names this instance's KV memory: a reader mapped an older one must handshake again
    lease_table: str = ""  # its ``/dev/shm`` lease table: a same-host reader confirms leases there, not over the bus


class RenewLease(Message):
    """Keep these transfers' blocks pinned.  The first peer to renew (or release) a transfer claims it:
    the ids another peer claimed are answered as unknown ones."""

    transfer_ids: list[str]


class LeaseRenewed(Message):
    expiry: dict[str, float]  # transfer id -> new expiry; unknown ids (or another reader's) are absent
    block_ids: dict[str, list[int]] = {}  # transfer id -> the blocks its lease holds, for each id in ``expiry``


class PushDone(Message):
    """Push mode, prefill -> decode: every rank wrote the prompt's KV; decode decodes from ``first_token_id``."""

    transfer_id: str
    first_token_id: int


class ReleaseKV(Message):
    """Decode is done with these transfers: prefill unpins (only for their claimer).  Push mode: the writer stopped."""

    transfer_ids: list[str]


# --- Inside one tensor-parallel instance: rank 0 -> a worker rank's KV agent ---


class RankConnect(Message):
    """Prepare to read a peer rank over ``transport`` (its offer's ``session`` and ``meta``)."""

    transport: str
    session: str
    meta: bytes = b""


class RankRead(Message):
    """Copy each remote range of the peer rank at ``session`` into this rank's KV memory (``write``: the reverse)."""

    transport: str
    session: str
    local_addrs: list[int]
    remote_addrs: list[int]
    lengths: list[int]
    write: bool = False


class RankReadDone(Message):
    """A ``RankRead`` ended: the indices of the ranges that failed (none: every range was copied)."""

    failed: list[int]
    seconds: float  # inside the backend
