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
    range_copy.copy_ranges(dst, src, *ranges)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(dst, expected)
    untouched = torch.ones_like(dst, dtype=torch.bool)
    for d, n in zip(dst_offsets, lengths):
        untouched[d : d + n] = False
    assert torch.all(dst[untouched] == 0)  # nothing written outside the ranges


def test_a_range_longer_than_every_chunk_slot_is_copied_whole(monkeypatch):
    monkeypatch.setattr(range_copy, "MAX_CHUNK_SLOTS", 2)  # each program loops over several steps
    src, dst = _buffers(6 * range_copy.BLOCK + 3)
    range_copy.copy_ranges(dst, src, [0], [0], [src.numel()])
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(dst, src)


def test_ranges_outside_either_buffer_are_refused_before_any_copy():
    src, dst = _buffers(100)
    with pytest.raises(ValueError, match="destination"):
        range_copy.copy_ranges(dst, src, [90], [0], [20])
    with pytest.raises(ValueError, match="source"):
        range_copy.copy_ranges(dst, src, [0], [95], [20])
    assert torch.all(dst == 0)


def test_alignment_is_checked_in_bytes():
    assert range_copy.aligned([0, 8, 4096], [16])
    assert not range_copy.aligned([0, 8], [12])
