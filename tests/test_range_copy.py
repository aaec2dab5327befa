"""The CUDA IPC reader's batched copy (``common.kv_transfer.range_copy``) against its reference, in Triton's CPU
interpreter here (compiled on a GPU by ``bench/kernels_gpu.sh``)."""

from __future__ import annotations

import random

import pytest
import torch

from common.kv_transfer import range_copy

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _buffers(words: int) -> tuple[torch.Tensor, torch.Tensor]:
    src = torch.randint(-(2**62), 2**62, (words,), dtype=torch.int64, device=DEVICE)
    return src, torch.zeros(words, dtype=torch.int64, device=DEVICE)


def _copier(dst: torch.Tensor, src: torch.Tensor) -> range_copy.RangeCopier:
    if DEVICE != "cuda":
        return range_copy.RangeCopier(dst, src)
    from common.kv_transfer.cuda_ipc import cuda_runtime
    return range_copy.RangeCopier(dst, src, torch.cuda.Stream(), cuda_runtime())


@pytest.mark.parametrize("seed", range(4))
def test_many_ranges_of_mixed_lengths_match_the_reference(seed):
    rng = random.Random(seed)
    src, dst = _buffers(40_000)
    # non-overlapping destinations in shuffled order, lengths around and across BLOCK (and past slot count)
    lengths = [rng.choice([1, 7, range_copy.BLOCK - 1, range_copy.BLOCK, range_copy.BLOCK + 1, 3 * range_copy.BLOCK + 5])
               for _ in range(8)]
    dst_offsets, at = [], 0
    for n in lengths:
        dst_offsets.append(at)
        at += n + rng.randrange(0, 9)
    src_offsets = [rng.randrange(0, src.numel() - n) for n in lengths]
    order = list(range(len(lengths)))
    rng.shuffle(order)
    ranges = [[v[i] for i in order] for v in (dst_offsets, src_offsets, lengths)]
    expected = dst.clone()
    range_copy.copy_ranges_reference(expected, src, *ranges)
    assert _copier(dst, src).copy(*ranges) == 0
    assert torch.equal(dst, expected)
    untouched = torch.ones_like(dst, dtype=torch.bool)
    for d, n in zip(dst_offsets, lengths):
        untouched[d : d + n] = False
    assert torch.all(dst[untouched] == 0)  # nothing written outside the ranges


def test_programs_walk_chunks_across_range_boundaries(monkeypatch):
    monkeypatch.setattr(range_copy, "PROGRAMS", 3)  # each program copies several chunks, some of two ranges
    src, dst = _buffers(6 * range_copy.BLOCK + 3)
    third = 2 * range_copy.BLOCK + 1
    assert _copier(dst, src).copy([0, third, 2 * third], [0, third, 2 * third], [third, third, src.numel() - 2 * third]) == 0
    assert torch.equal(dst, src)


def test_the_most_ranges_a_copy_takes_and_one_more():
    src, dst = _buffers(2 * range_copy.MAX_RANGES)
    copier = _copier(dst, src)
    odd = list(range(1, 2 * range_copy.MAX_RANGES, 2))
    assert copier.copy(odd, odd, [1] * len(odd)) == 0  # one word each: every other word
    assert torch.equal(dst[1::2], src[1::2]) and torch.all(dst[::2] == 0)
    with pytest.raises(ValueError, match="ranges in one copy"):
        copier.copy(list(range(len(odd) + 1)), list(range(len(odd) + 1)), [1] * (len(odd) + 1))


def test_ranges_outside_either_buffer_are_refused_before_any_copy():
    src, dst = _buffers(100)
    with pytest.raises(ValueError, match="destination"):
        _copier(dst, src).copy([90], [0], [20])
    with pytest.raises(ValueError, match="source"):
        _copier(dst, src).copy([0], [95], [20])
    assert torch.all(dst == 0)


def test_alignment_is_checked_in_bytes():
    assert range_copy.aligned([0, 8, 4096], [16])
    assert not range_copy.aligned([0, 8], [12])
