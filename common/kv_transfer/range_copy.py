"""Many byte ranges copied between two GPU buffers in one launch (the CUDA IPC backend's batched copy).

A KV read is a list of (source offset, destination offset, length) ranges.  Issued as one
``cudaMemcpyAsync`` each, a heterogeneous-TP read of 256 head-slice ranges of 256 KiB cost ~10 µs per
copy in launches and ran at 0.19x of the homogeneous read's 16 whole-block ranges (docs/benchmarks.md).
Here a fixed grid of ``PROGRAMS`` Triton programs splits the read's ``BLOCK``-word chunks into equal
consecutive shares, so the whole read is one launch whatever the number of ranges; over NVLink the SMs
read the peer's memory directly (the peer allocation is mapped by CUDA IPC).

``RangeCopier`` holds one (destination, source) pair.  On CUDA it captures the launch once in a CUDA
graph that copies the ranges' table from pinned memory to the device and runs the kernel on it: a copy is
then the table written into pinned memory and the graph's launch, on the copier's stream (measured on an
H200's host: Triton's launcher from Python alone took ~40 µs, a ``torch.tensor`` of the table ~20, against
a 64 MiB copy's ~60 µs).  ``copy_blocks`` writes a table of whole blocks with numpy from two lists of block
ids, so a read between engines of one block size plans nothing range by range.  Elsewhere (Triton's CPU
interpreter, in the tests) the same kernel is launched eagerly.

Units are 16 bytes: every offset and length must be a multiple of 16 bytes (``aligned``); the caller
falls back to per-range copies otherwise.  The kernel moves them as pairs of int64 words, and computing its
addresses as ``2 * unit`` lets Triton prove them 16-byte aligned and issue 16-byte loads and stores (52 us
for 64 MiB in 16 ranges on an H200 against 62 with the 8-byte units before).  ``copy_ranges_reference``
is the plain PyTorch statement of the same contract, used by the tests.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the CUDA IPC backend then copies range by range
    triton = None

UNIT = 16  # bytes: every offset and length is a whole number of these
# Tuned on an H200 (64 MiB in 16 ranges, wall time of ``copy`` with its table and wait: 72-82 us over 512-4,096
# programs and 512-2,048-word chunks, 73 here; a ``copy_`` of one contiguous buffer: 59 us wall, 42 on the GPU);
# with 16-byte units, 1,024-4,096-word chunks, 4 or 8 warps and 1,024-4,096 programs all took 51-54 us (events).
BLOCK = 1024  # int64 words per chunk (8 KiB); a range's last chunk may be shorter
PROGRAMS = 2048  # the grid, fixed so that a graph can hold the launch (~16 programs per SM of an H200)
NUM_WARPS = 4
MAX_RANGES = 512  # ranges per copy (``rank_io.MAX_RANGES_PER_CALL`` batches reads to this)
MEMCPY_HOST_TO_DEVICE = 1  # cudaMemcpyKind

# The table, int64: [ranges, chunks, chunks per program], then MAX_RANGES destination offsets, source
# offsets, lengths (in units), and MAX_RANGES + 1 first-chunk indices (after the last range's: the total).
HEADER = 3
DST, SRC, LEN, FIRST = (HEADER + i * MAX_RANGES for i in range(4))
TABLE_WORDS = FIRST + MAX_RANGES + 1


def available() -> bool:
    """Whether the batched copy can run (``triton`` importable)."""
    return triton is not None


def aligned(*offsets_and_lengths: list[int]) -> bool:
    """Whether every byte offset and length given is a whole number of units."""
    return all(v % UNIT == 0 for values in offsets_and_lengths for v in values)


def copy_ranges_reference(dst: torch.Tensor, src: torch.Tensor, dst_offsets: list[int],
                          src_offsets: list[int], lengths: list[int]) -> None:
    """Each range's units of the int64 tensor ``src`` into ``dst``, offsets and lengths in units."""
    for d, s, n in zip(dst_offsets, src_offsets, lengths):
        dst[2 * d : 2 * (d + n)].copy_(src[2 * s : 2 * (s + n)])


_COUNTS = np.arange(MAX_RANGES + 1, dtype=np.int64)  # 0, 1, ...: first chunks of whole blocks, multiplied


class RangeCopier:
    """Copies ranges from ``src`` into ``dst`` (1-D int64 word views of two buffers on one device, an even
    number of words each) on ``stream``.  Thread-safe: copies are serialised (they share the table and the
    stream)."""

    def __init__(self, dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream | None = None,
                 runtime: ctypes.CDLL | None = None):
        """On CUDA, ``runtime`` is the CUDA runtime torch loaded (``cuda_ipc.cuda_runtime``) and ``stream``
        the copies' stream; the graph is captured here (the kernel compiled first, by an empty launch)."""
        self.dst, self.src = dst, src
        self.dst_units, self.src_units = dst.numel() // 2, src.numel() // 2
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
                    if runtime.cudaMemcpyAsync(self._table.data_ptr(), self._host.data_ptr(), TABLE_WORDS * 8,
                                               MEMCPY_HOST_TO_DEVICE, stream.cuda_stream):
                        raise RuntimeError("capturing the range table's copy failed")
                    self._launch()
                finally:
                    graph.capture_end()
            stream.synchronize()
            self._graph = graph  # owns the executable
            self._graph_exec = graph.raw_cuda_graph_exec()

    def copy(self, dst_offsets: list[int], src_offsets: list[int], lengths: list[int]) -> int:
        """``copy_ranges_reference`` in one launch, waited for; offsets and lengths in units, every range
        inside its buffer (``ValueError`` otherwise, before anything is copied).  Returns the CUDA error
        code of the launch or of the wait (0: copied)."""
        if len(lengths) > MAX_RANGES:
            raise ValueError(f"{len(lengths)} ranges in one copy (at most {MAX_RANGES})")
        self._check(dst_offsets, src_offsets, lengths)
        with self._lock:
            return self._run(self._fill(0, 0, dst_offsets, src_offsets, lengths))

    def copy_blocks(self, dst_ids: list[int], src_ids: list[int], block: int, dst_base: int = 0, src_base: int = 0,
                    tail: tuple[list[int], list[int], list[int]] = ([], [], [])) -> int:
        """Whole blocks of ``block`` units, source block ``src_ids[i]`` (at unit ``src_base + id * block``)
        into destination block ``dst_ids[i]``, then the ranges of ``tail`` (destination offsets, source
        offsets, lengths, as ``copy``'s), in one launch, waited for; ``ValueError`` for a block or range
        outside its buffer, before anything is copied.  Returns ``copy``'s error code."""
        n = len(dst_ids)
        if n != len(src_ids) or n + len(tail[2]) > MAX_RANGES or block <= 0:
            raise ValueError(f"{n} destination and {len(src_ids)} source blocks of {block} units and {len(tail[2])} "
                             f"ranges in one copy (at most {MAX_RANGES})")
        self._check(*tail)
        chunks = -(-2 * block // BLOCK)  # a block's
        with self._lock:
            words = self._words
            for at, ids, base, units, side in ((DST, dst_ids, dst_base, self.dst_units, "destination"),
                                               (SRC, src_ids, src_base, self.src_units, "source")):
                column = words[at : at + n]
                column[:] = ids
                column *= block
                column += base
                # numpy's reductions over the written offsets: faster than min() and max() of the lists
                if n and (np.minimum.reduce(column) < 0 or np.maximum.reduce(column) + block > units):
                    raise ValueError(f"a {side} block lies outside the {side} buffer")
            words[LEN : LEN + n] = block
            np.multiply(_COUNTS[: n + 1], chunks, out=words[FIRST : FIRST + n + 1])
            if tail[2]:
                return self._run(self._fill(n, n * chunks, *tail))
            self._header(n, n * chunks)
            return self._run(n)

    def _check(self, dst_offsets: list[int], src_offsets: list[int], lengths: list[int]) -> None:
        if not lengths:
            return
        if max(d + k for d, k in zip(dst_offsets, lengths)) > self.dst_units or min(dst_offsets) < 0:
            raise ValueError("a destination range lies outside the destination buffer")
        if max(s + k for s, k in zip(src_offsets, lengths)) > self.src_units or min(src_offsets) < 0:
            raise ValueError("a source range lies outside the source buffer")

    def _fill(self, at: int, total: int, dst_offsets: list[int], src_offsets: list[int], lengths: list[int]) -> int:
        """Table rows ``at``.. are these ranges, their chunks numbered from ``total``; the header for all
        rows.  Returns how many rows the table holds."""
        words = self._words
        n = at + len(lengths)
        first = words[FIRST + at : FIRST + n + 1]
        for i, k in enumerate(lengths):
            first[i] = total
            total += -(-2 * k // BLOCK)
        first[len(lengths)] = total
        words[DST + at : DST + n] = dst_offsets
        words[SRC + at : SRC + n] = src_offsets
        words[LEN + at : LEN + n] = lengths
        self._header(n, total)
        return n

    def _header(self, rows: int, chunks: int) -> None:
        words = self._words
        words[0], words[1], words[2] = rows, chunks, -(-chunks // PROGRAMS)

    def _run(self, rows: int) -> int:
        """Launch the table's copy and wait for it (the table is filled; the lock held)."""
        if not rows:
            return 0
        if self._graph_exec is None:
            self._table.copy_(self._host)
            self._launch()
            return 0
        rt, stream = self._runtime, self._stream.cuda_stream
        return rt.cudaGraphLaunch(self._graph_exec, stream) or rt.cudaStreamSynchronize(stream)

    def _launch(self) -> None:
        _copy_ranges_kernel[(PROGRAMS,)](self.dst, self.src, self._table, BLOCK=BLOCK, CAP=MAX_RANGES,
                                         LOG2_CAP=MAX_RANGES.bit_length(), num_warps=NUM_WARPS)


if triton is not None:

    @triton.jit
    def _copy_ranges_kernel(dst, src, table, BLOCK: tl.constexpr, CAP: tl.constexpr, LOG2_CAP: tl.constexpr):
        """Program p copies chunks [p * share, (p + 1) * share) of the read (the ranges' chunks in order);
        ``table`` as ``HEADER``/``DST``/``SRC``/``LEN``/``FIRST`` say, for ``CAP`` = ``MAX_RANGES``; offsets
        and lengths in units of two words, so ``2 * ...`` tells Triton every address is 16-byte aligned."""
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
            mask = idx < 2 * tl.load(len_at + r)
            words = tl.load(src + 2 * tl.load(src_at + r) + idx, mask=mask)
            tl.store(dst + 2 * tl.load(dst_at + r) + idx, words, mask=mask)
