"""Block ids -> byte ranges for the block-major KV layout.

Block ``b`` of an engine is ``[base + b * block_bytes, base + (b + 1) * block_bytes)``.
Consecutive pairs ``(local b, remote r)``, ``(b + 1, r + 1)`` are merged into
one range; a run breaks as soon as either side stops being consecutive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

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
    prev_local = prev_remote = -2
    for local, remote in zip(local_ids, remote_ids):
        if out.lengths and local == prev_local + 1 and remote == prev_remote + 1:
            out.lengths[-1] += block_bytes
        else:
            out.local_addrs.append(local_base + local * block_bytes)
            out.remote_addrs.append(remote_base + remote * block_bytes)
            out.lengths.append(block_bytes)
        prev_local, prev_remote = local, remote
    return out


def _check_ids(side: str, ids: list[int], num_blocks: int) -> None:
    for b in ids:
        if not 0 <= b < num_blocks:
            raise ValueError(f"{side} block id {b} outside [0, {num_blocks})")
