"""The CUDA IPC reader's batched copy (``common.kv_transfer.range_copy``) against its reference, in Triton's CPU
interpreter here (compiled on a GPU by ``bench/kernels_gpu.sh``).  Offsets and lengths are in units of 16 bytes
(two int64 words)."""

from __future__ import annotations

import random

import pytest
import torch

from common.kv_transfer import range_copy

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CHUNK = range_copy.BLOCK // 2  # units a program copies at a time


def _buffers(units: int) -> tuple[torch.Tensor, torch.Tensor]:
    src = torch.randint(-(2**62), 2**62, (2 * units,), dtype=torch.int64, device=DEVICE)
    return src, torch.zeros(2 * units, dtype=torch.int64, device=DEVICE)


def _copier(dst: torch.Tensor, src: torch.Tensor) -> range_copy.RangeCopier:
    if DEVICE != "cuda":
        return range_copy.RangeCopier(dst, src)
    from common.kv_transfer.cuda_ipc import cuda_runtime
    return range_copy.RangeCopier(dst, src, torch.cuda.Stream(), cuda_runtime())


def _written_only(dst: torch.Tensor, dst_offsets: list[int], lengths: list[int]) -> bool:
    """Whether ``dst`` is zero outside the destination ranges."""
    untouched = torch.ones_like(dst, dtype=torch.bool)
    for d, n in zip(dst_offsets, lengths):
        untouched[2 * d : 2 * (d + n)] = False
    return bool(torch.all(dst[untouched] == 0))


@pytest.mark.parametrize("seed", range(4))
def test_many_ranges_of_mixed_lengths_match_the_reference(seed):
    rng = random.Random(seed)
    src, dst = _buffers(20_000)
    # non-overlapping destinations in shuffled order, lengths around and across a chunk (and past slot count)
    lengths = [rng.choice([1, 7, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5]) for _ in range(8)]
    dst_offsets, at = [], 0
    for n in lengths:
        dst_offsets.append(at)
        at += n + rng.randrange(0, 9)
    src_offsets = [rng.randrange(0, src.numel() // 2 - n) for n in lengths]
    order = list(range(len(lengths)))
    rng.shuffle(order)
    ranges = [[v[i] for i in order] for v in (dst_offsets, src_offsets, lengths)]
    expected = dst.clone()
    range_copy.copy_ranges_reference(expected, src, *ranges)
    assert _copier(dst, src).copy(*ranges) == 0
    assert torch.equal(dst, expected)
    assert _written_only(dst, dst_offsets, lengths)


def test_programs_walk_chunks_across_range_boundaries(monkeypatch):
    monkeypatch.setattr(range_copy, "PROGRAMS", 3)  # each program copies several chunks, some of two ranges
    src, dst = _buffers(6 * CHUNK + 3)
    third = 2 * CHUNK + 1
    assert _copier(dst, src).copy([0, third, 2 * third], [0, third, 2 * third], [third, third, src.numel() // 2 - 2 * third]) == 0
    assert torch.equal(dst, src)


def test_the_most_ranges_a_copy_takes_and_one_more():
    src, dst = _buffers(2 * range_copy.MAX_RANGES)
    copier = _copier(dst, src)
    odd = list(range(1, 2 * range_copy.MAX_RANGES, 2))
    assert copier.copy(odd, odd, [1] * len(odd)) == 0  # one unit each: every other unit
    pairs, copied = dst.view(-1, 2), src.view(-1, 2)
    assert torch.equal(pairs[1::2], copied[1::2]) and torch.all(pairs[::2] == 0)
    with pytest.raises(ValueError, match="ranges in one copy"):
        copier.copy(list(range(len(odd) + 1)), list(range(len(odd) + 1)), [1] * (len(odd) + 1))


def test_ranges_outside_either_buffer_are_refused_before_any_copy():
    src, dst = _buffers(100)
    with pytest.raises(ValueError, match="destination"):
        _copier(dst, src).copy([90], [0], [20])
    with pytest.raises(ValueError, match="source"):
        _copier(dst, src).copy([0], [95], [20])
    assert torch.all(dst == 0)


@pytest.mark.parametrize("seed", range(3))
def test_whole_blocks_and_a_tail_match_the_reference(seed, monkeypatch):
    """``copy_blocks``: a table written from two id lists (numpy) equals the same blocks given as ranges."""
    monkeypatch.setattr(range_copy, "PROGRAMS", 7)
    rng = random.Random(seed)
    block, num_blocks, dst_base, src_base = rng.choice([1, 5, CHUNK + 3]), 12, 3, 11
    src, dst = _buffers(src_base + num_blocks * block)
    dst_ids, src_ids = rng.sample(range(num_blocks), 7), rng.sample(range(num_blocks), 7)
    tail = ([dst_base + dst_ids[-1] * block], [src_base + src_ids[-1] * block], [max(1, block // 2)])
    dst_ids, src_ids = dst_ids[:-1], src_ids[:-1]  # the last block: its first half only, as the tail
    as_ranges = ([dst_base + b * block for b in dst_ids] + tail[0], [src_base + b * block for b in src_ids] + tail[1],
                 [block] * len(dst_ids) + tail[2])
    expected = dst.clone()
    range_copy.copy_ranges_reference(expected, src, *as_ranges)
    assert _copier(dst, src).copy_blocks(dst_ids, src_ids, block, dst_base, src_base, tail) == 0
    assert torch.equal(dst, expected)
    assert _written_only(dst, as_ranges[0], as_ranges[2])


def test_a_block_copy_reaching_outside_a_buffer_is_refused_before_any_copy():
    src, dst = _buffers(40)
    copier = _copier(dst, src)
    with pytest.raises(ValueError, match="destination"):
        copier.copy_blocks([0, 4], [0, 1], 10)  # destination block 4 ends at unit 50
    with pytest.raises(ValueError, match="source"):
        copier.copy_blocks([0], [3], 10, src_base=5)
    with pytest.raises(ValueError, match="source"):
        copier.copy_blocks([0], [0], 10, tail=([20], [35], [10]))
    assert torch.all(dst == 0)
    assert copier.copy_blocks([], [], 10) == 0  # nothing to copy


def test_alignment_is_checked_in_units():
    assert range_copy.aligned([0, 16, 4096], [32])
    assert not range_copy.aligned([0, 8], [16])
