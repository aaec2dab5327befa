"""Which prefill rank each decode rank reads each of its KV heads from, and the byte ranges of that read.

A rank of TP size N holds a contiguous slice of the KV heads (``KVRankMemory.first_head``,
``num_heads``); when N exceeds the model's KV heads, several ranks hold the same head.
Each decode rank reads exactly the heads it owns: for every head, from one of the
prefill ranks holding it (the ``reader.rank mod holders``-th, so replicated heads
spread over the readers); consecutive heads with the same source form one ``Source``.
Between two engines of equal TP size every rank reads its own counterpart whole.  Push mode writes
the same pieces the other way (``plan_targets``).

The ranges of one (decode rank, source) pair are ``ranges.token_ranges`` over the
two ranks' block tables: token positions map between different block sizes, and a
head slice of a block is one contiguous range in the head-major layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.kv_transfer.ranges import BlockTable, KVLayout
from common.messages import KVRankMemory


@dataclass(frozen=True)
class Source:
    """A decode rank reads KV heads ``heads`` (global indices) from prefill rank ``rank``."""

    rank: int
    heads: range


def plan_sources(reader: KVRankMemory, peers: list[KVRankMemory]) -> list[Source]:
    """Where ``reader`` reads each of its heads from, among the prefill ranks ``peers`` (in rank order).

    Raises ``ValueError`` when a head of ``reader`` is held by no peer rank.
    """
    sources: list[Source] = []
    for head in range(reader.first_head, reader.first_head + reader.num_heads):
        holders = [p.rank for p in peers if p.first_head <= head < p.first_head + p.num_heads]
        if not holders:
            raise ValueError(f"no prefill rank holds KV head {head}")
        rank = holders[reader.rank % len(holders)]
        if sources and sources[-1].rank == rank and sources[-1].heads.stop == head:
            sources[-1] = Source(rank, range(sources[-1].heads.start, head + 1))
        else:
            sources.append(Source(rank, range(head, head + 1)))
    return sources


def plan_targets(writers: list[KVRankMemory], peers: list[KVRankMemory]) -> list[list[Source]]:
    """Push mode, the mirror of ``plan_sources``: per rank of ``writers`` (in rank order), the peer ranks it
    writes and which heads (``Source.rank`` is the peer's).  Every head of every peer rank is written by
    exactly the writer rank that ``plan_sources`` would have that peer rank read it from, so a head the peer
    replicates over several ranks is written into each of them, and one the writers replicate is written once.
    Raises ``ValueError`` when a peer head is held by no writer rank."""
    targets: list[list[Source]] = [[] for _ in writers]
    for peer in peers:
        for source in plan_sources(peer, writers):
            targets[source.rank].append(Source(peer.rank, source.heads))
    return targets


def table_of(memory: KVRankMemory, block_size: int, block_ids: list[int]) -> BlockTable:
    """``memory``'s blocks ``block_ids`` as one side of a token-mapped read."""
    layout = KVLayout(memory.region.addr, memory.block_bytes, memory.num_blocks)
    return BlockTable(layout, block_size, block_ids, memory.first_head, memory.num_heads)

