"""Many byte ranges copied between two GPU buffers in one kernel launch (the CUDA IPC reader's batched copy).

A KV read is a list of (source offset, destination offset, length) ranges.  Issued as one
``cudaMemcpyAsync`` each, a heterogeneous-TP read of 256 head-slice ranges of 256 KiB cost ~10 µs per
copy in launches and ran at 0.19x of the homogeneous read's 16 whole-block ranges (docs/benchmarks.md).
Here one Triton program per (range, chunk slot) streams its share of the range in ``BLOCK``-word steps, so
the whole read is one launch whatever the number of ranges; over NVLink the SMs read the peer's memory
directly (the peer allocation is mapped by CUDA IPC).

Units are 8-byte words: every offset and length must be a multiple of 8 bytes (``aligned``); the caller
falls back to per-range copies otherwise.  ``copy_ranges_reference`` is the plain PyTorch statement of the
same contract, used by the tests.
"""

from __future__ import annotations

import contextlib

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the CUDA IPC backend then copies range by range
    triton = None

WORD = 8  # bytes per element the kernel moves
# Tuned on an H200 (64 MiB in 16 ranges, kernel time by CUDA events): 512-word steps, 4 warps and up to 512
# programs per range copied in 56 us (1,024 / 256 / 4 warps: 66 us; a device-to-device ``copy_`` of the same
# bytes: 43 us); larger warps counts ran at 67-74 us.
BLOCK = 512  # words per step of one program (4 KiB)
MAX_CHUNK_SLOTS = 512  # programs per range at most; each loops over its share of a longer range
NUM_WARPS = 4


def available() -> bool:
    """Whether the batched copy can run (``triton`` importable)."""
    return triton is not None


def aligned(*offsets_and_lengths: list[int]) -> bool:
    """Whether every byte offset and length given is a whole number of words."""
    return all(v % WORD == 0 for values in offsets_and_lengths for v in values)


def copy_ranges_reference(dst: torch.Tensor, src: torch.Tensor, dst_offsets: list[int],
                          src_offsets: list[int], lengths: list[int]) -> None:
    """``dst[d:d+n] = src[s:s+n]`` for each range, offsets and lengths in words of the int64 tensors."""
    for d, s, n in zip(dst_offsets, src_offsets, lengths):
        dst[d : d + n].copy_(src[s : s + n])


def copy_ranges(dst: torch.Tensor, src: torch.Tensor, dst_offsets: list[int], src_offsets: list[int],
                lengths: list[int], stream: torch.cuda.Stream | None = None) -> None:
    """``copy_ranges_reference`` in one launch on ``stream`` (the current one if None); ``dst`` and ``src``
    are 1-D int64 tensors (word views of the two buffers) and the ranges must lie inside them.  Returns
    once the kernel is queued: synchronise the stream before reading ``dst``."""
    if not lengths:
        return
    if max(d + n for d, n in zip(dst_offsets, lengths)) > dst.numel() or min(dst_offsets) < 0:
        raise ValueError("a destination range lies outside the destination buffer")
    if max(s + n for s, n in zip(src_offsets, lengths)) > src.numel() or min(src_offsets) < 0:
        raise ValueError("a source range lies outside the source buffer")
    slots = min(MAX_CHUNK_SLOTS, triton.cdiv(max(lengths), BLOCK))
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        # a few KiB: copied from pageable memory before the launch, on the same stream
        table = torch.tensor([dst_offsets, src_offsets, lengths], dtype=torch.int64, device=dst.device)
        _copy_ranges_kernel[(len(lengths), slots)](dst, src, table[0], table[1], table[2], BLOCK=BLOCK,
                                                   num_warps=NUM_WARPS)


if triton is not None:

    @triton.jit
    def _copy_ranges_kernel(dst, src, dst_offsets, src_offsets, lengths, BLOCK: tl.constexpr):
        """Program (r, c) copies words c*BLOCK, (c + slots)*BLOCK, ... of range r."""
        r = tl.program_id(0)
        slot = tl.program_id(1)
        slots = tl.num_programs(1)
        n = tl.load(lengths + r)
        d = tl.load(dst_offsets + r)
        s = tl.load(src_offsets + r)
        lanes = tl.arange(0, BLOCK)
        for start in range(slot * BLOCK, n, slots * BLOCK):
            idx = start + lanes
            mask = idx < n
            tl.store(dst + d + idx, tl.load(src + s + idx, mask=mask), mask=mask)
