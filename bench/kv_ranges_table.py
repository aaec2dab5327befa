"""Byte ranges a decode reads per request, for prefill/decode pairs of other TP sizes and block sizes.

A 2,048-token prompt of a Llama-3.2-1B-shaped model (16 layers, 8 KV heads, head_dim 64, fp16)
in the head-major KV layout.  Each decode rank reads the KV heads it holds from the prefill
rank(s) holding them (``ranges.token_ranges`` once per such prefill rank, heads as
``TensorParallel.kv_heads`` splits them); two block-id patterns: consecutive ids on both
sides (a fresh engine) and shuffled runs of 8 blocks (as a block manager leaves them after
churn).  Counting only: nothing is read.

    python -m bench.kv_ranges_table
"""

from __future__ import annotations

import argparse
import random

import torch

from common.arith import ceil_div
from common.engine.kv_cache import KVCache
from common.engine.parallel import TensorParallel
from common.kv_transfer.ranges import BlockTable, ByteRanges, KVLayout, token_ranges

LAYERS, KV_HEADS, HEAD_DIM, DTYPE = 16, 8, 64, torch.float16
NUM_BLOCKS = 1024  # of each engine: room for the prompt at the smallest block size, shuffled
RUN_BLOCKS = 8

# (case, prefill TP, decode TP, prefill block size, decode block size)
CASES = [
    ("homogeneous", 1, 1, 16, 16),
    ("p=1 -> d=2", 1, 2, 16, 16),
    ("p=2 -> d=1", 2, 1, 16, 16),
    ("p=2 -> d=2", 2, 2, 16, 16),
    ("bs 16 -> 32", 1, 1, 16, 32),
    ("bs 32 -> 16", 1, 1, 32, 16),
    ("p=1 -> d=2, bs 16 -> 32", 1, 2, 16, 32),
    ("p=2 -> d=1, bs 32 -> 16", 2, 1, 32, 16),
]


def rank_heads(tp_size: int, rank: int) -> range:
    first, count = TensorParallel(rank, tp_size).kv_heads(KV_HEADS)
    return range(first, first + count)


def block_ids(num_tokens: int, block_size: int, shuffled_seed: int | None) -> list[int]:
    """The prompt's block ids: consecutive from 0, or shuffled runs of ``RUN_BLOCKS`` consecutive ids."""
    runs = [list(range(s, s + RUN_BLOCKS)) for s in range(0, NUM_BLOCKS, RUN_BLOCKS)]
    if shuffled_seed is not None:
        random.Random(shuffled_seed).shuffle(runs)
    return [b for run in runs for b in run][:ceil_div(num_tokens, block_size)]


def side(rank: int, heads: range, block_size: int, ids: list[int]) -> BlockTable:
    """One rank's blocks, in a KV tensor of its own (``rank`` spaces the ranks' base addresses apart)."""
    block_bytes = KVCache.bytes_per_block(LAYERS, block_size, len(heads), HEAD_DIM, DTYPE)
    return BlockTable(KVLayout((rank + 1) << 40, block_bytes, NUM_BLOCKS), block_size, ids, heads.start, len(heads))


def decode_rank_reads(prefill_tp: int, prefill_bs: int, decode_bs: int, decode_heads: range, num_tokens: int,
                      shuffled: bool) -> list[ByteRanges]:
    """A decode rank's reads: one per prefill rank holding some of its heads (the first holding them)."""
    prefill_ids = block_ids(num_tokens, prefill_bs, 1 if shuffled else None)
    decode_ids = block_ids(num_tokens, decode_bs, 2 if shuffled else None)
    local = side(0, decode_heads, decode_bs, decode_ids)
    reads, covered = [], set()
    for rank in range(prefill_tp):
        held = rank_heads(prefill_tp, rank)
        heads = range(max(held.start, decode_heads.start), min(held.stop, decode_heads.stop))
        if heads and heads.start not in covered:
            covered.update(heads)
            remote = side(rank, held, prefill_bs, prefill_ids)
            reads.append(token_ranges(local, remote, heads=heads, num_tokens=num_tokens))
    return reads


def row(case: str, prefill_tp: int, decode_tp: int, prefill_bs: int, decode_bs: int, num_tokens: int) -> str:
    cells = []
    for shuffled in (False, True):
        per_rank = [decode_rank_reads(prefill_tp, prefill_bs, decode_bs, rank_heads(decode_tp, rank), num_tokens,
                                      shuffled) for rank in range(decode_tp)]
        counts = [sum(len(r.lengths) for r in reads) for reads in per_rank]
        total_bytes = sum(r.total_bytes for reads in per_rank for r in reads)
        cells += [" / ".join(f"{c:,}" for c in counts), f"{sum(counts):,}", f"{total_bytes / sum(counts) / 1024:,.0f}"]
    return (f"| {case} | {prefill_tp} -> {decode_tp} | {prefill_bs} -> {decode_bs} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    args = p.parse_args()
    print("| case | TP | block size | per decode rank | per request | KiB/range "
          "| per decode rank (runs of 8) | per request (runs of 8) | KiB/range (runs of 8) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for case in CASES:
        print(row(*case, args.tokens))


if __name__ == "__main__":
    main()
