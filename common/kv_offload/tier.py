"""``OffloadTier``: the engine's side of the CPU offload tier (rank 0, the engine thread).

Storing: a committed block whose last reference goes (``BlockManager.on_evictable``)
is offered to the tier; when the host pool has (or can evict for) a slot, the
tier keeps the block's one reference, so the block cannot be handed out while
its copy runs, and queues the copy.  The copy starts with the next step
(``take_ops``) on every rank; once the step after it ran on every rank
(``step_done``) the copy finished: the host entry becomes a hit and the tier
releases the block (``BlockManager.release``), the only place it is freed.

Loading: ``load_prefix`` continues a sequence's prefix-cache hits from the
host pool; each hit names a device block at once and queues its copy in,
which the next step runs before its forward pass, so no step reads the block
before its KV is there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from common.config import require
from common.engine.block_manager import Block, BlockManager
from common.engine.config import EngineConfig
from common.engine.kv_cache import KVCache
from common.engine.model_config import ModelConfig
from common.engine.sequence import InvalidRequest, Sequence, SequenceStatus
from common.kv_offload.host_pool import HostPool


def host_slots(config: EngineConfig, mc: ModelConfig, dtype: torch.dtype) -> int:
    """Blocks (of every KV head) that ``--kv-offload-cpu-gib`` holds; 0 = offload off."""
    if config.kv_offload_cpu_gib == 0:
        return 0
    block_bytes = KVCache.bytes_per_block(mc.num_layers, config.block_size, mc.num_kv_heads, mc.head_dim, dtype)
    slots = int(config.kv_offload_cpu_gib * 2**30) // block_bytes
    require(slots > 0, "kv_offload_cpu_gib", f"{config.kv_offload_cpu_gib} GiB holds no KV block of {block_bytes} bytes")
    return slots


@dataclass
class OffloadOps:
    """One step's copies, as ``(host slot, device block)`` pairs: loads run before its forward pass."""

    loads: list[tuple[int, int]] = field(default_factory=list)
    stores: list[tuple[int, int]] = field(default_factory=list)


class OffloadTier:
    def __init__(self, block_manager: BlockManager, num_slots: int):
        self.bm = block_manager
        self.pool = HostPool(num_slots)
        self.queued = OffloadOps()
        self.in_flight: list[tuple[int, int]] = []  # stores started by the last step
        self.stored_blocks = 0  # copies out finished
        self.loaded_blocks = 0  # copies in queued
        block_manager.on_evictable = self.offer

    @property
    def pending(self) -> bool:
        """Copies queued or not yet known finished: the engine keeps stepping until none are."""
        return bool(self.queued.loads or self.queued.stores or self.in_flight)

    def offer(self, block: Block) -> bool:
        """Queue a copy of this committed block to host memory; True = the tier now holds its reference."""
        slot = self.pool.reserve(block.hash, block.token_ids)
        if slot is None:
            return False
        self.queued.stores.append((slot, block.id))
        return True

    def store_seq(self, seq: Sequence | None) -> int:
        """Queue copies of the sequence's committed blocks not in host memory yet; returns how many
        (0 for None: a request that finished meanwhile).  Blocks whose KV is valid but not yet registered
        (a handed-back remote prompt before its first step: ``Scheduler.finish_remote``) are registered first."""
        if seq is None:
            return 0
        self.bm.commit(seq)
        n = 0
        for block_id in seq.block_table[: len(seq.block_hashes)]:
            block = self.bm.blocks[block_id]
            if self.offer(block):
                self.bm.hold(block_id)
                n += 1
        return n

    def load_prefix(self, seq: Sequence, max_blocks: int) -> int:
        """Continue the sequence's prefix-cache hits (block ``len(seq.block_hashes)`` on, at most
        ``max_blocks`` in all) from host memory.  A block the sequence holds already (a decode
        allocation) is loaded into; past its table a free block is taken.  Returns the blocks loaded."""
        bm, bs = self.bm, self.bm.block_size
        start = len(seq.block_hashes)
        for i in range(start, min(max_blocks, seq.num_tokens // bs)):
            chunk = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = bm.block_hash(seq, i, chunk, seq.block_hashes[-1] if i else 0)
            slot = self.pool.lookup(h, chunk)
            if slot is None or (i == len(seq.block_table) and not bm.can_grow(seq, (i + 1) * bs)):
                break
            bm.grow(seq, (i + 1) * bs)
            bm.register(seq, h, chunk)
            self.queued.loads.append((slot, seq.block_table[i]))
        loaded = len(seq.block_hashes) - start
        self.loaded_blocks += loaded
        return loaded

    def load_remote(self, seq: Sequence | None, start: int) -> int:
        """A remote request's prompt blocks from ``start`` (where its local hits end) that host memory
        holds, a leading run, are loaded and count as cached; returns how many (0 for None: aborted)."""
        if seq is None:
            return 0
        if seq.status is not SequenceStatus.WAITING_FOR_REMOTE_KVS or start != len(seq.block_hashes):
            raise InvalidRequest(f"request {seq.request_id!r}: no remote blocks to load from {start} on", "start")
        loaded = self.load_prefix(seq, seq.num_prompt_tokens // self.bm.block_size)
        seq.num_cached_tokens += loaded * self.bm.block_size
        return loaded

    def take_ops(self) -> OffloadOps:
        """The copies the step about to run starts."""
        ops, self.queued = self.queued, OffloadOps()
        return ops

    def step_done(self, ops: OffloadOps) -> None:
        """The step that started ``ops`` ran on every rank, so the stores of the step before finished."""
        done, self.in_flight = self.in_flight, ops.stores
        self.pool.mark_ready([slot for slot, _ in done])
        self.stored_blocks += len(done)
        for _, block_id in done:
            self.bm.release(block_id)
