"""Many byte ranges copied between two GPU buffers in one launch (the CUDA IPC backend's batched copy).

A KV read is a list of (source offset, destination offset, length) ranges.  Issued as one
``cudaMemcpyAsync`` each, a heterogeneous-TP read of 256 head-slice ranges of 256 KiB cost ~10 µs per
copy in launches and ran at 0.19x of the homogeneous read's 16 whole-block ranges (docs/benchmarks.md).
Here a fixed grid of ``PROGRAMS`` Triton programs splits the read's ``BLOCK``-word chunks into equal
consecutive shares, so the whole read is one launch whatever the number of ranges; over NVLink the SMs
read the peer's memory directly (the peer allocation is mapped by CUDA IPC).

``RangeCopier`` holds one (destination, source) pair.  On CUDA it captures the launch once in a CUDA
graph whose kernel reads the ranges from a device table: a copy is then the table written into pinned
memory, its host-to-device copy and the graph's launch, three runtime calls on the copier's stream
(measured on an H200's host: Triton's launcher from Python alone took ~40 µs, a ``torch.tensor`` of the
table ~20, against a 64 MiB copy's ~60 µs).  Elsewhere (Triton's CPU interpreter, in the tests) the same
kernel is launched eagerly.

Units are 8-byte words: every offset and length must be a multiple of 8 bytes (``aligned``); the caller
falls back to per-range copies otherwise.  ``copy_ranges_reference`` is the plain PyTorch statement of the
same contract, used by the tests.
"""

from __future__ import annotations

import ctypes
import threading

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the CUDA IPC backend then copies range by range
    triton = None

WORD = 8  # bytes per element the kernel moves
# Tuned on an H200 (64 MiB in 16 ranges, wall time of ``copy`` with its table and wait: 72-82 us over 512-4,096
# programs and 512-2,048-word chunks, 73 here; a ``copy_`` of one contiguous buffer: 59 us wall, 42 on the GPU).
BLOCK = 1024  # words per chunk (8 KiB); a range's last chunk may be shorter
PROGRAMS = 2048  # the grid, fixed so that a graph can hold the launch (~16 programs per SM of an H200)
NUM_WARPS = 4
MAX_RANGES = 512  # ranges per copy (``rank_io.MAX_RANGES_PER_CALL`` batches reads to this)
MEMCPY_HOST_TO_DEVICE = 1  # cudaMemcpyKind

# The table, in words: [ranges, chunks, chunks per program], then MAX_RANGES destination offsets, source
# offsets, lengths, and MAX_RANGES + 1 first-chunk indices (after the last range's: the total).
HEADER = 3
DST, SRC, LEN, FIRST = (HEADER + i * MAX_RANGES for i in range(4))
TABLE_WORDS = FIRST + MAX_RANGES + 1


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


class RangeCopier:
    """Copies ranges from ``src`` into ``dst`` (1-D int64 word views of two buffers on one device) on
    ``stream``.  Thread-safe: copies are serialised (they share the table and the stream)."""

    def __init__(self, dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream | None = None,
                 runtime: ctypes.CDLL | None = None):
        """On CUDA, ``runtime`` is the CUDA runtime torch loaded (``cuda_ipc.cuda_runtime``) and ``stream``
        the copies' stream; the graph is captured here (the kernel compiled first, by an empty launch)."""
        self.dst, self.src = dst, src
        self._lock = threading.Lock()
        cuda = dst.is_cuda
        self._host = torch.zeros(TABLE_WORDS, dtype=torch.int64, pin_memory=cuda)
        self._words = self._host.numpy()
        self._table = torch.zeros(TABLE_WORDS, dtype=torch.int64, device=dst.device)
        self._graph_exec = None
        if cuda:
            self._runtime, self._stream = runtime, stream
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(stream):
                self._launch()  # compiles; copies nothing (no ranges)
                # not ``torch.cuda.graph``: it synchronises the device and collects garbage first
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    self._launch()
                finally:
                    graph.capture_end()
            stream.synchronize()
            self._graph = graph  # owns the executable
            self._graph_exec = graph.raw_cuda_graph_exec()

    def copy(self, dst_offsets: list[int], src_offsets: list[int], lengths: list[int]) -> int:
        """``copy_ranges_reference`` in one launch, waited for; offsets and lengths in words, every range
        inside its buffer (``ValueError`` otherwise, before anything is copied).  Returns the CUDA error
        code of the launch or of the wait (0: copied)."""
        n = len(lengths)
        if n > MAX_RANGES:
            raise ValueError(f"{n} ranges in one copy (at most {MAX_RANGES})")
        if not n:
            return 0
        if max(d + k for d, k in zip(dst_offsets, lengths)) > self.dst.numel() or min(dst_offsets) < 0:
            raise ValueError("a destination range lies outside the destination buffer")
        if max(s + k for s, k in zip(src_offsets, lengths)) > self.src.numel() or min(src_offsets) < 0:
            raise ValueError("a source range lies outside the source buffer")
        first, total = [], 0
        for k in lengths:
            first.append(total)
            total += -(-k // BLOCK)
        with self._lock:
            words = self._words
            words[:HEADER] = (n, total, -(-total // PROGRAMS))
            words[DST : DST + n] = dst_offsets
            words[SRC : SRC + n] = src_offsets
            words[LEN : LEN + n] = lengths
            words[FIRST : FIRST + n] = first
            words[FIRST + n] = total
            if self._graph_exec is None:
                self._table.copy_(self._host)
                self._launch()
                return 0
            rt, stream = self._runtime, self._stream.cuda_stream
            return (rt.cudaMemcpyAsync(self._table.data_ptr(), self._host.data_ptr(), TABLE_WORDS * WORD,
                                       MEMCPY_HOST_TO_DEVICE, stream)
                    or rt.cudaGraphLaunch(self._graph_exec, stream) or rt.cudaStreamSynchronize(stream))

    def _launch(self) -> None:
        _copy_ranges_kernel[(PROGRAMS,)](self.dst, self.src, self._table, BLOCK=BLOCK, CAP=MAX_RANGES,
                                         LOG2_CAP=MAX_RANGES.bit_length(), num_warps=NUM_WARPS)


if triton is not None:

    @triton.jit
    def _copy_ranges_kernel(dst, src, table, BLOCK: tl.constexpr, CAP: tl.constexpr, LOG2_CAP: tl.constexpr):
        """Program p copies chunks [p * share, (p + 1) * share) of the read (the ranges' chunks in order);
        ``table`` as ``HEADER``/``DST``/``SRC``/``LEN``/``FIRST`` say, for ``CAP`` = ``MAX_RANGES``."""
        dst_at, src_at, len_at, first_at = table + 3, table + 3 + CAP, table + 3 + 2 * CAP, table + 3 + 3 * CAP
        ranges, chunks, share = tl.load(table), tl.load(table + 1), tl.load(table + 2)
        begin = tl.program_id(0) * share
        end = tl.minimum(begin + share, chunks)
        lo = begin * 0  # the range holding chunk `begin`: the last r with first[r] <= begin (binary search)
        hi = ranges
        for _ in tl.static_range(LOG2_CAP):
            mid = (lo + hi) // 2
            below = tl.load(first_at + mid) <= begin
            lo = tl.where(below, mid, lo)
            hi = tl.where(below, hi, mid)
        lanes = tl.arange(0, BLOCK)
        r = lo
        for chunk in range(begin, end):
            r = tl.where(chunk >= tl.load(first_at + r + 1), r + 1, r)  # every range has at least one chunk
            idx = (chunk - tl.load(first_at + r)) * BLOCK + lanes
            mask = idx < tl.load(len_at + r)
            words = tl.load(src + tl.load(src_at + r) + idx, mask=mask)
            tl.store(dst + tl.load(dst_at + r) + idx, words, mask=mask)
