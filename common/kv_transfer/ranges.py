"""Token positions and KV heads -> what a read copies, for the head-major KV layout (``KVCache.LAYOUT``).

Block ``b`` of an engine is ``[base + b * block_bytes, base + (b + 1) * block_bytes)``; inside it,
head ``h`` (of the heads that engine holds) is ``block_size`` tokens, each token every
layer's K and V.  Two forms:

* ``whole_blocks``: between two sides of one block size holding the same heads (the common case: equal
  TP sizes and block sizes) a read is whole blocks, ``BlockPairs``: two lists of block ids, no per-range
  planning; a backend that copies block tables natively (CUDA IPC) takes them as they are, the others
  their merged byte ranges (``BlockPairs.byte_ranges``);
* ``token_ranges``: any two sides (other block sizes, a head slice, a push's first token anywhere in a
  block): byte ranges, pieces contiguous on both sides merged into one range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from common.arith import ceil_div
from common.messages import MemoryRegion


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Where an engine's KV blocks live: block ``b`` starts at ``base_addr + b * block_bytes``."""

    base_addr: int
    block_bytes: int
    num_blocks: int

    @classmethod
    def of(cls, kv_cache: Any) -> "KVLayout":
        """The layout of a ``common.engine.kv_cache.KVCache`` (its ``data`` must be contiguous)."""
        if not kv_cache.data.is_contiguous():
            raise ValueError("KV cache tensor must be contiguous")
        return cls(kv_cache.data.data_ptr(), kv_cache.block_bytes, kv_cache.num_blocks)

    @property
    def region(self) -> MemoryRegion:
        return MemoryRegion(self.base_addr, self.block_bytes * self.num_blocks)


class ByteRanges(NamedTuple):
    """Byte ranges copied from ``remote_addrs[i]`` into ``local_addrs[i]``, ``lengths[i]`` bytes each; a backend
    reports one status per range."""

    local_addrs: list[int]
    remote_addrs: list[int]
    lengths: list[int]

    @property
    def total_bytes(self) -> int:
        return sum(self.lengths)

    @property
    def count(self) -> int:
        """Statuses a copy of these reports."""
        return len(self.lengths)

    def window(self, start: int, stop: int) -> ByteRanges:
        return ByteRanges(self.local_addrs[start:stop], self.remote_addrs[start:stop], self.lengths[start:stop])


class BlockPairs(NamedTuple):
    """Whole blocks of ``block_bytes`` copied from remote block ``remote_ids[i]`` (at ``remote_base + id *
    block_bytes``) into local block ``local_ids[i]``, then ``tail``: the byte ranges of a last block the read
    ends inside.  A backend reports one status per whole block, then one per range of the tail."""

    local_base: int
    remote_base: int
    block_bytes: int
    local_ids: list[int]
    remote_ids: list[int]
    tail: ByteRanges

    @property
    def total_bytes(self) -> int:
        return len(self.local_ids) * self.block_bytes + self.tail.total_bytes

    @property
    def count(self) -> int:
        """Statuses a copy of these reports."""
        return len(self.local_ids) + self.tail.count

    def window(self, start: int, stop: int) -> BlockPairs:
        """The statuses ``[start, stop)`` of ``count``'s order as a copy of their own."""
        n = len(self.local_ids)
        return self._replace(local_ids=self.local_ids[start:stop], remote_ids=self.remote_ids[start:stop],
                             tail=self.tail.window(max(start - n, 0), max(stop - n, 0)))

    def byte_ranges(self) -> tuple[ByteRanges, list[int]]:
        """The copy as byte ranges, blocks whose ids both go up by one merged into one range, and how many
        statuses of ``count``'s each range stands for (in order)."""
        size, ranges = self.block_bytes, ByteRanges([], [], [])
        runs = _id_runs(self.local_ids, self.remote_ids, 0, len(self.local_ids))
        for first_local, first_remote, blocks in runs:
            ranges.local_addrs.append(self.local_base + first_local * size)
            ranges.remote_addrs.append(self.remote_base + first_remote * size)
            ranges.lengths.append(blocks * size)
        for addrs, tail_addrs in zip(ranges, self.tail):
            addrs += tail_addrs
        return ranges, [blocks for _, _, blocks in runs] + [1] * self.tail.count

    @staticmethod
    def block_statuses(range_statuses: list, per_range: list[int]) -> list:
        """``count``'s statuses from those of ``byte_ranges``' ranges (a short list stays short)."""
        return [status for status, n in zip(range_statuses, per_range) for _ in range(n)]


Copy = ByteRanges | BlockPairs  # what one rank copies from one peer rank


@dataclass(frozen=True, slots=True)
class BlockTable:
    """One side of a read: where the engine's blocks live, how many tokens each holds, the KV heads they hold
    (global indices ``[first_head, first_head + num_heads)``: a TP rank's slice) and the request's block ids
    (block ``i`` holds tokens ``[i * block_size, (i + 1) * block_size)``)."""

    layout: KVLayout
    block_size: int
    block_ids: list[int]
    first_head: int = 0
    num_heads: int = 1

    @property
    def heads(self) -> range:
        return range(self.first_head, self.first_head + self.num_heads)


def whole_blocks(local: BlockTable, remote: BlockTable, *, heads: range, num_tokens: int,
                 skip_leading: int = 0) -> BlockPairs | None:
    """The read of ``token_ranges`` (no ``first_token``) as whole blocks when that is what it is: both sides
    have one block size and hold exactly ``heads`` (a block is then those heads' tokens on both sides); a
    last block the prompt ends inside is the tail's ranges (its tokens of each head), so exactly the same
    bytes move.  None for any other read; ``ValueError`` as ``token_ranges``."""
    size = local.block_size
    whole = len(heads) * size * _token_bytes("local", local)
    if not (size == remote.block_size and whole == local.layout.block_bytes == remote.layout.block_bytes):
        return None  # before the checks: ``token_ranges`` makes them
    token_bytes = _checked(local, remote, heads, num_tokens, skip_leading, None)
    whole_to, tail_from = num_tokens // size, max(num_tokens // size, skip_leading) * size
    tail = (_block_ranges(local, remote, heads, tail_from, num_tokens, token_bytes) if tail_from < num_tokens
            else ByteRanges([], [], []))
    return BlockPairs(local.layout.base_addr, remote.layout.base_addr, whole, local.block_ids[skip_leading:whole_to],
                      remote.block_ids[skip_leading:whole_to], tail)


def token_ranges(local: BlockTable, remote: BlockTable, *, heads: range, num_tokens: int,
                 skip_leading: int = 0, first_token: int | None = None) -> ByteRanges:
    """Merged ranges reading tokens ``[skip_leading * local.block_size, num_tokens)`` of the global KV heads
    ``heads`` from ``remote``'s blocks into ``local``'s, whatever the two block sizes.

    The first ``skip_leading`` local blocks are already local (prefix-cache hits).  ``first_token``, when
    given, starts the tokens there instead (anywhere in a block: a push writes each chunk of a prompt
    as prefill computes it).  In the head-major layout a
    run of tokens of one head is contiguous (every layer, K and V), so the read is one piece per head and run
    of ``min(block sizes)`` tokens; pieces come in local address order, merged where contiguous on both sides
    (equal block sizes: one range per block for a head slice, whole-block runs for every head).  Raises
    ``ValueError`` when ``heads`` is not a contiguous range inside both sides' heads, a side's block ids do
    not cover ``num_tokens`` exactly, an id is out of range, a local id repeats, the two sides' bytes per
    token and head differ, or neither block size divides the other.
    """
    token_bytes = _checked(local, remote, heads, num_tokens, skip_leading, first_token)
    begin = skip_leading * local.block_size if first_token is None else first_token
    if local.block_size == remote.block_size:
        return _block_ranges(local, remote, heads, begin, num_tokens, token_bytes)
    return mapped_ranges(local, remote, heads, begin, num_tokens, token_bytes)


def _checked(local: BlockTable, remote: BlockTable, heads: range, num_tokens: int, skip_leading: int,
             first_token: int | None) -> int:
    """The bytes of one token of one head, once the arguments of a read pass ``token_ranges``' checks."""
    token_bytes, remote_token_bytes = _token_bytes("local", local), _token_bytes("remote", remote)
    if remote_token_bytes != token_bytes:
        raise ValueError(f"{token_bytes} bytes per token and head locally, {remote_token_bytes} remotely")
    if heads.step != 1 or not heads or not (
            local.first_head <= heads.start and heads.stop <= local.first_head + local.num_heads
            and remote.first_head <= heads.start and heads.stop <= remote.first_head + remote.num_heads):
        raise ValueError(f"heads {heads} are not a non-empty contiguous range within local heads {local.heads} "
                         f"and remote heads {remote.heads}")
    if max(local.block_size, remote.block_size) % min(local.block_size, remote.block_size):
        raise ValueError(f"block sizes {local.block_size} and {remote.block_size}: neither divides the other")
    for side, table in (("local", local), ("remote", remote)):
        needed = ceil_div(num_tokens, table.block_size)
        if len(table.block_ids) != needed:
            raise ValueError(f"{len(table.block_ids)} {side} blocks of {table.block_size} tokens "
                             f"for {num_tokens} tokens (need {needed})")
        _check_ids(side, table.block_ids, table.layout.num_blocks)
    if len(set(local.block_ids)) != len(local.block_ids):
        raise ValueError("duplicate local block ids")
    if not 0 <= skip_leading <= len(local.block_ids):
        raise ValueError(f"skip_leading={skip_leading} outside [0, {len(local.block_ids)}]")
    if first_token is not None and not 0 <= first_token <= num_tokens:
        raise ValueError(f"first_token={first_token} outside [0, {num_tokens}]")
    return token_bytes


def _block_ranges(local: BlockTable, remote: BlockTable, heads: range, begin: int, num_tokens: int,
                  token_bytes: int) -> ByteRanges:
    """``token_ranges`` of two sides of one block size, in plain Python: a whole block holds ``heads`` in one
    piece on both sides, so the pieces are about one per block, and numpy's fixed cost per call (~0.3 ms on a
    cold cache) would dominate a short read.  When those pieces are whole blocks on both sides (every head),
    blocks whose ids both go up by one are one piece (``_id_runs``: a request's blocks are usually a few
    runs); a partial first or last block is one piece per head."""
    size = local.block_size
    head_bytes = size * token_bytes
    local_base = local.layout.base_addr + (heads.start - local.first_head) * head_bytes
    remote_base = remote.layout.base_addr + (heads.start - remote.first_head) * head_bytes
    local_block, remote_block = local.layout.block_bytes, remote.layout.block_bytes
    local_ids, remote_ids = local.block_ids, remote.block_ids
    whole_from, whole_to = ceil_div(begin, size), num_tokens // size  # blocks every token of which is read
    whole = len(heads) * head_bytes
    if whole == local_block == remote_block:
        pieces = [(local_base + first_local * local_block, remote_base + first_remote * remote_block, count * whole)
                  for first_local, first_remote, count in _id_runs(local_ids, remote_ids, whole_from, whole_to)]
    else:
        pieces = [(local_base + local_ids[i] * local_block, remote_base + remote_ids[i] * remote_block, whole)
                  for i in range(whole_from, whole_to)]
    for i in {begin // size, ceil_div(num_tokens, size) - 1}:  # the partial first and last blocks, if any
        start, end = max(i * size, begin), min((i + 1) * size, num_tokens)
        if whole_from <= i < whole_to or start >= end:
            continue
        offset = (start - i * size) * token_bytes
        local_addr = local_base + local_ids[i] * local_block + offset
        remote_addr = remote_base + remote_ids[i] * remote_block + offset
        pieces += [(local_addr + h * head_bytes, remote_addr + h * head_bytes, (end - start) * token_bytes)
                   for h in range(len(heads))]
    pieces.sort()
    merged = ByteRanges([], [], [])
    local_addrs, remote_addrs, lengths = merged
    local_end = remote_end = -1
    for local_addr, remote_addr, length in pieces:
        if local_addr == local_end and remote_addr == remote_end:
            lengths[-1] += length
        else:
            local_addrs.append(local_addr)
            remote_addrs.append(remote_addr)
            lengths.append(length)
        local_end, remote_end = local_addr + length, remote_addr + length
    return merged


def _id_runs(local_ids: list[int], remote_ids: list[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """(first local id, first remote id, blocks) of each longest run of blocks ``[start, stop)`` whose ids go
    up by one on both sides, in order (one comprehension finds where runs start: ~7 us for 128 blocks)."""
    if start >= stop:
        return []
    breaks = [i for i in range(start + 1, stop)
              if local_ids[i] != local_ids[i - 1] + 1 or remote_ids[i] != remote_ids[i - 1] + 1]
    return [(local_ids[i], remote_ids[i], j - i) for i, j in zip([start, *breaks], [*breaks, stop])]


def mapped_ranges(local: BlockTable, remote: BlockTable, heads: range, begin: int, num_tokens: int,
                  token_bytes: int) -> ByteRanges:
    """``token_ranges`` from token ``begin`` (checked arguments), any block sizes: one piece per head and run
    of the smaller block size, in numpy."""
    run = min(local.block_size, remote.block_size)
    grid = np.arange(begin - begin % run, num_tokens, run, dtype=np.int64)
    grid = grid[np.maximum(grid, begin) < num_tokens]  # from ``begin == num_tokens`` off a run: nothing to read
    starts = np.maximum(grid, begin)
    head_ids = np.arange(heads.start, heads.stop, dtype=np.int64)
    local_addrs, remote_addrs = (_piece_addrs(table, starts, head_ids, token_bytes) for table in (local, remote))
    lengths = np.repeat((np.minimum(grid + run, num_tokens) - starts) * token_bytes, len(head_ids))
    return _merged(local_addrs, remote_addrs, lengths)


def _piece_addrs(table: BlockTable, starts: np.ndarray, heads: np.ndarray, token_bytes: int) -> np.ndarray:
    """Address of token ``starts[i]`` of global head ``heads[j]`` on ``table``'s side, flattened ``[i, j]``."""
    blocks = np.asarray(table.block_ids, np.int64)[starts // table.block_size]
    token_addrs = table.layout.base_addr + blocks * table.layout.block_bytes + starts % table.block_size * token_bytes
    head_offsets = (heads - table.first_head) * table.block_size * token_bytes
    return (token_addrs[:, None] + head_offsets).ravel()


def _merged(local_addrs: np.ndarray, remote_addrs: np.ndarray, lengths: np.ndarray) -> ByteRanges:
    """The pieces in local address order, each merged into the previous one when it follows it on both sides."""
    order = np.argsort(local_addrs, kind="stable")
    local_addrs, remote_addrs, lengths = local_addrs[order], remote_addrs[order], lengths[order]
    starts_run = np.ones(len(lengths), dtype=bool)
    starts_run[1:] = ((local_addrs[1:] != local_addrs[:-1] + lengths[:-1])
                      | (remote_addrs[1:] != remote_addrs[:-1] + lengths[:-1]))
    first = np.flatnonzero(starts_run)
    if not len(first):
        return ByteRanges([], [], [])
    return ByteRanges(local_addrs[first].tolist(), remote_addrs[first].tolist(),
                      np.add.reduceat(lengths, first).tolist())


def _token_bytes(side: str, table: BlockTable) -> int:
    """Bytes of one token of one head (every layer, K and V); ``ValueError`` when the block does not divide."""
    if table.block_size <= 0 or table.num_heads <= 0 or table.layout.block_bytes % (table.num_heads * table.block_size):
        raise ValueError(f"{side} blocks of {table.layout.block_bytes} bytes do not hold {table.num_heads} heads of "
                         f"{table.block_size} tokens")
    return table.layout.block_bytes // (table.num_heads * table.block_size)


def _check_ids(side: str, ids: list[int], num_blocks: int) -> None:
    if ids and not (min(ids) >= 0 and max(ids) < num_blocks):  # min/max: a per-id loop costs ~10 us a read
        bad = next(b for b in ids if not 0 <= b < num_blocks)
        raise ValueError(f"{side} block id {bad} outside [0, {num_blocks})")
