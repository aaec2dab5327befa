"""Block ids -> byte ranges for the block-major KV layout.

Block ``b`` of an engine is ``[base + b * block_bytes, base + (b + 1) * block_bytes)``.
Consecutive pairs ``(local b, remote r)``, ``(b + 1, r + 1)`` are merged into
one range; a run breaks as soon as either side stops being consecutive.
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
    local_addrs: list[int]
    remote_addrs: list[int]
    lengths: list[int]

    @property
    def total_bytes(self) -> int:
        return sum(self.lengths)

    def add(self, local_addr: int, remote_addr: int, length: int) -> None:
        """Append a range, or extend the last one when the new one follows it on both sides."""
        if (self.lengths and local_addr == self.local_addrs[-1] + self.lengths[-1]
                and remote_addr == self.remote_addrs[-1] + self.lengths[-1]):
            self.lengths[-1] += length
        else:
            self.local_addrs.append(local_addr)
            self.remote_addrs.append(remote_addr)
            self.lengths.append(length)


def block_ranges(
    local_ids: list[int],
    remote_ids: list[int],
    *,
    local_base: int,
    remote_base: int,
    block_bytes: int,
    local_num_blocks: int,
    remote_num_blocks: int,
) -> ByteRanges:
    """Merged ranges reading ``remote_ids[i]`` into ``local_ids[i]`` for every ``i``.

    Raises ``ValueError`` on mismatched lengths, ids out of range, a duplicate
    local id (two reads into one block) or a non-positive ``block_bytes``.
    """
    if len(local_ids) != len(remote_ids):
        raise ValueError(f"{len(local_ids)} local blocks but {len(remote_ids)} remote blocks")
    if block_bytes <= 0:
        raise ValueError(f"block_bytes must be > 0, got {block_bytes}")
    _check_ids("local", local_ids, local_num_blocks)
    _check_ids("remote", remote_ids, remote_num_blocks)
    if len(set(local_ids)) != len(local_ids):
        raise ValueError("duplicate local block ids")
    out = ByteRanges([], [], [])
    for local, remote in zip(local_ids, remote_ids):
        out.add(local_base + local * block_bytes, remote_base + remote * block_bytes, block_bytes)
    return out


@dataclass(frozen=True, slots=True)
class BlockTable:
    """One side of a token-mapped read: where the engine's blocks live, how many tokens each holds,
    and the request's block ids (block ``i`` holds tokens ``[i * block_size, (i + 1) * block_size)``)."""

    layout: KVLayout
    block_size: int
    block_ids: list[int]


def token_ranges(local: BlockTable, remote: BlockTable, *, num_layers: int, num_tokens: int,
                 skip_leading: int = 0) -> ByteRanges:
    """Merged ranges reading tokens ``[skip_leading * local.block_size, num_tokens)`` of a prompt from
    ``remote``'s blocks into ``local``'s, whatever the two block sizes.

    The first ``skip_leading`` local blocks are already local (prefix-cache hits).  Ranges come in
    local address order, which merges every pair contiguous on both sides.  Raises ``ValueError``
    when a side's block ids do not cover ``num_tokens`` exactly, an id is out of range, a local id
    repeats, the two sides' bytes per token differ, or neither block size divides the other.
    """
    planes = 2 * num_layers  # K and V of every layer
    token_bytes, remote_token_bytes = _token_bytes("local", local, planes), _token_bytes("remote", remote, planes)
    if remote_token_bytes != token_bytes:
        raise ValueError(f"{token_bytes} bytes per token and plane locally, {remote_token_bytes} remotely")
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
    # Both block sizes are multiples of the smaller, so every run of that many tokens has one local
    # and one remote block; each run is one piece per plane, at the same offset in every plane.
    lsize, rsize = local.block_size, remote.block_size
    run = min(lsize, rsize)
    starts = np.arange(skip_leading * lsize, num_tokens, run, dtype=np.int64)
    local_addrs = (local.layout.base_addr + np.asarray(local.block_ids, np.int64)[starts // lsize]
                   * local.layout.block_bytes + starts % lsize * token_bytes)
    remote_addrs = (remote.layout.base_addr + np.asarray(remote.block_ids, np.int64)[starts // rsize]
                    * remote.layout.block_bytes + starts % rsize * token_bytes)
    plane = np.arange(planes, dtype=np.int64)
    local_addrs = (local_addrs[:, None] + plane * lsize * token_bytes).ravel()
    remote_addrs = (remote_addrs[:, None] + plane * rsize * token_bytes).ravel()
    lengths = np.repeat(np.minimum(run, num_tokens - starts) * token_bytes, planes)
    return _merged(local_addrs, remote_addrs, lengths)


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


def _token_bytes(side: str, table: BlockTable, planes: int) -> int:
    """Bytes of one token of one (layer, K/V) plane; ``ValueError`` when the block does not divide."""
    if table.block_size <= 0 or table.layout.block_bytes % (planes * table.block_size):
        raise ValueError(f"{side} blocks of {table.layout.block_bytes} bytes do not hold {planes} planes of "
                         f"{table.block_size} tokens")
    return table.layout.block_bytes // (planes * table.block_size)


def _check_ids(side: str, ids: list[int], num_blocks: int) -> None:
    for b in ids:
        if not 0 <= b < num_blocks:
            raise ValueError(f"{side} block id {b} outside [0, {num_blocks})")
