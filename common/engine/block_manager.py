"""Paged KV blocks: reference counts, prefix caching over hash chains, transfer pins.

A full block is identified by ``hash_block(its token ids, previous block's hash)``,
so one hash names a whole prefix.  A block is registered under its hash only
once its KV is valid (``commit``), so a block still being computed or read from
a remote engine is never offered as a hit.  A freed block keeps its hash (and
can be hit again) until it is handed out as a fresh block.

With an offload tier (``on_evictable``), a committed block whose last reference
goes is offered to it first; a block the tier takes stays held until the tier
``release``s it, so it is never handed out while its copy to host memory runs.
"""

from __future__ import annotations

from array import array
from collections import Counter, OrderedDict
from collections.abc import Callable

import xxhash

from common.arith import ceil_div
from common.engine.sequence import Sequence


def hash_block(token_ids: tuple[int, ...], prev_hash: int) -> int:
    """64-bit xxhash of a block's token ids chained with the previous block's hash (0 for the first)."""
    h = xxhash.xxh64(prev_hash.to_bytes(8, "little"))
    h.update(array("q", token_ids).tobytes())
    return h.intdigest()


class Block:
    __slots__ = ("id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # ref_count 0, reuse oldest first
        self.pins: dict[str, list[int]] = {}
        self.pin_refs: Counter[int] = Counter()
        self.on_evictable: Callable[[Block], bool] | None = None  # True: the callee now holds the block

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return len(self.blocks) - len(self.free)

    @property
    def num_pinned(self) -> int:
        return len(self.pin_refs)

    def blocks_for(self, num_tokens: int) -> int:
        return ceil_div(num_tokens, self.block_size)

    def allocate_prefix(self, seq: Sequence, max_blocks: int) -> int:
        """Give a sequence without blocks its leading prefix-cache hits (at most ``max_blocks``).
        Returns the number of tokens they cover."""
        if seq.block_table:
            raise ValueError(f"request {seq.request_id} already holds blocks")
        if not self.enable_prefix_caching:
            return 0
        bs, prev = self.block_size, 0
        for i in range(min(max_blocks, seq.num_tokens // bs)):
            chunk = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            prev = self.block_hash(seq, i, chunk, prev)
            block_id = self.hash_to_block.get(prev)
            if block_id is None or self.blocks[block_id].token_ids != chunk:
                break
            self._ref(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(prev)
        return len(seq.block_table) * bs

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(seq.block_table) <= len(self.free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Append fresh blocks until the sequence's blocks hold ``num_tokens`` (check ``can_grow`` first)."""
        for _ in range(self.blocks_for(num_tokens) - len(seq.block_table)):
            block_id, _ = self.free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash = block.token_ids = None
            block.ref_count = 1
            seq.block_table.append(block_id)

    def commit(self, seq: Sequence) -> None:
        """Register the full blocks whose KV is now valid (below ``num_computed_tokens``) as cache hits."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), min(seq.num_computed_tokens // bs, len(seq.block_table))):
            chunk = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            self.register(seq, self.block_hash(seq, i, chunk, seq.block_hashes[-1] if i else 0), chunk)

    def hash_prompt(self, seq: Sequence) -> None:
        """Compute the hash chain of the prompt's full blocks now (``seq.prompt_hashes``), ahead of their lookup
        and registration (``commit``).  A push-mode decode does it while the prefill computes the prompt: the
        first step after the KV lands registers every prompt block at once, and hashing 2,048 tokens there took
        ~0.3 ms of that step's host time on an H200's host (docs/benchmarks.md, session 13)."""
        if not self.enable_prefix_caching:
            return
        bs, known = self.block_size, seq.prompt_hashes
        for i in range(len(known), seq.num_prompt_tokens // bs):
            known.append(hash_block(tuple(seq.token_ids[i * bs : (i + 1) * bs]), known[-1] if i else 0))

    @staticmethod
    def block_hash(seq: Sequence, i: int, chunk: tuple[int, ...], prev: int) -> int:
        """The hash of ``seq``'s full block ``i`` (its token ids ``chunk``) chained to ``prev`` (block ``i - 1``'s;
        0 for the first): the prompt's, when ``hash_prompt`` computed it, else computed now."""
        known = seq.prompt_hashes
        return known[i] if i < len(known) else hash_block(chunk, prev)

    def register(self, seq: Sequence, block_hash: int, token_ids: tuple[int, ...]) -> None:
        """Name the sequence's next unnamed block a cache hit: its KV is valid, or is loaded before any step reads it."""
        block = self.blocks[seq.block_table[len(seq.block_hashes)]]
        seq.block_hashes.append(block_hash)
        block.hash, block.token_ids = block_hash, token_ids
        self.hash_to_block[block_hash] = block.id

    def free_seq(self, seq: Sequence) -> None:
        """Drop the sequence's references (tail first, so a prefix's head stays cached longest)."""
        for block_id in reversed(seq.block_table):
            self._unref(block_id)
        seq.block_table.clear()
        seq.block_hashes.clear()

    def pin(self, transfer_id: str, block_ids: list[int]) -> None:
        """Hold ``block_ids`` (already in use) under ``transfer_id`` until ``unpin``."""
        if transfer_id in self.pins:
            raise ValueError(f"transfer id {transfer_id!r} is already pinned")
        for block_id in block_ids:
            if self.blocks[block_id].ref_count == 0:
                raise ValueError(f"block {block_id} is free and cannot be pinned")
        for block_id in block_ids:
            self._ref(block_id)
            self.pin_refs[block_id] += 1
        self.pins[transfer_id] = list(block_ids)

    def unpin(self, transfer_id: str) -> bool:
        """Release a transfer's pins; False if the id is unknown (already released)."""
        block_ids = self.pins.pop(transfer_id, None)
        if block_ids is None:
            return False
        for block_id in reversed(block_ids):
            self.pin_refs[block_id] -= 1
            if self.pin_refs[block_id] == 0:
                del self.pin_refs[block_id]
            self._unref(block_id)
        return True

    def hold(self, block_id: int) -> None:
        """One more reference to a block in use (``release`` drops it)."""
        if self.blocks[block_id].ref_count == 0:
            raise ValueError(f"block {block_id} is free and cannot be held")
        self._ref(block_id)

    def release(self, block_id: int) -> None:
        """Drop a reference taken by ``hold`` or kept by ``on_evictable``."""
        self._unref(block_id)

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count += 1
        if block.ref_count == 1:
            del self.free[block_id]

    def _unref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count > 0:
            return
        if block.hash is not None and self.on_evictable is not None and self.on_evictable(block):
            block.ref_count = 1  # held by the offload tier until it releases the block
            return
        self.free[block_id] = None
