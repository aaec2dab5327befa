"""CUDA graphs of the decode forward (nano-vllm style): one launch instead of ~1000 per step.

A decode-only batch (every sequence computes one token) of B sequences whose longest
context spans ``n`` blocks replays the graph of bucket ``(batch, blocks)``: ``batch`` the
smallest of 1, 2, 4, 8, 16, 32, ... (multiples of 16) and ``max_num_seqs`` that holds B,
``blocks`` the next power of two >= n (at most the blocks of ``max_model_len``).  Graphs
are captured on first use (off CUDA a ``RerunGraph`` stands in: tests and ``bench.host_step``),
share one memory pool, and read fixed input buffers, which each step fills with one copy from
pinned host memory (``host_copies.Staging``; block table rows rewritten only where they changed)
and, under async scheduling, one copy of the step in flight's sampled ids.  Padded
rows repeat row 0 (token, position, slot, blocks) and write row 0's own K/V to its slot
(``AttentionMetadata.kv_source_rows``), so they change nothing.  A graph records whichever
backend the model runs: on the triton backend the decode kernels (no host sync; their split-K
scratch is allocated inside the call, from the graph's pool).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from common.arith import ceil_div
from common.engine.attention import AttentionMetadata
from common.engine.host_copies import Staging
from common.engine.inflight_step import fill_pending
from common.engine.kv_cache import KVCache
from common.engine.model import CausalLM

logger = logging.getLogger(__name__)


class Graph(Protocol):
    """What ``torch.cuda.CUDAGraph`` offers here: ``replay()`` reruns the captured kernels."""

    def replay(self) -> None: ...


class RerunGraph:
    """A ``Graph`` off CUDA: ``replay()`` reruns the same forward over the same fixed buffers into the same
    output tensor, so everything else of ``DecodeGraphs`` runs as on a GPU."""

    def __init__(self, forward: Callable[[], torch.Tensor], out: torch.Tensor):
        self.forward, self.out = forward, out

    def replay(self) -> None:
        self.out.copy_(self.forward())


def batch_buckets(max_num_seqs: int) -> list[int]:
    return sorted({b for b in (1, 2, 4, 8, *range(16, max_num_seqs + 1, 16)) if b <= max_num_seqs} | {max_num_seqs})


class DecodeGraphs:
    def __init__(self, model: CausalLM, kv_cache: KVCache, max_num_seqs: int, max_model_len: int):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.max_blocks = ceil_div(max_model_len, self.block_size)
        self.batch_sizes = batch_buckets(max_num_seqs)
        device = kv_cache.data.device
        # rows: input ids, positions, slots, context lens, K/V source rows
        self.inputs = torch.zeros(5, max_num_seqs, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(max_num_seqs, self.max_blocks, dtype=torch.int64, device=device)
        self.query_start_loc = torch.arange(max_num_seqs + 1, device=device)
        self.pending = torch.zeros(max_num_seqs, dtype=torch.int64, device=device)  # the step in flight's ids
        self.graphs: dict[tuple[int, int], tuple[Graph, torch.Tensor]] = {}
        self.pool = None
        # host side of ``inputs`` and ``block_tables`` (each step's in a contiguous prefix); per staging buffer the
        # bucket and block table rows it holds: a step rewrites only the rows that changed since that buffer's last
        self.staging = Staging(((5 + self.max_blocks) * max_num_seqs,), torch.int64, device)
        self.staged_rows: list[tuple[tuple[int, int], list[list[int]]] | None] = [None] * len(self.staging.buffers)

    def _stage_inputs(self, host: np.ndarray, input_ids: list[int], positions: list[int],
                      block_tables: list[list[int]]) -> None:
        """Rows of ``inputs`` into ``host`` ``[5, batch]``; padded rows repeat row 0 (their source row)."""
        num_seqs, bs = len(input_ids), self.block_size
        host[0, :num_seqs] = input_ids
        host[1, :num_seqs] = positions
        host[2, :num_seqs] = [table[p // bs] * bs + p % bs for table, p in zip(block_tables, positions)]
        host[3, :num_seqs] = host[1, :num_seqs] + 1
        host[4, :num_seqs] = range(num_seqs)
        host[:, num_seqs:] = host[:, :1]
        host[4, num_seqs:] = 0

    def _stage_tables(self, host: np.ndarray, block_tables: list[list[int]], key: tuple[int, int]) -> None:
        """The batch's block tables into ``host`` ``[batch, blocks]`` (zero-padded, padded rows row 0's), writing
        only the rows that differ from what this buffer held for the same bucket."""
        batch, blocks = key
        held = self.staged_rows[self.staging.index]
        old = held[1] if held is not None and held[0] == key else []
        rows = [table[:blocks] for table in block_tables]
        rows += [rows[0]] * (batch - len(rows))
        for r, row in enumerate(rows):
            if r < len(old) and old[r] == row:
                continue
            host[r, : len(row)] = row
            host[r, len(row) :] = 0
        self.staged_rows[self.staging.index] = (key, rows)

    def bucket(self, num_seqs: int, max_context_len: int) -> tuple[int, int] | None:
        """``(batch, blocks)`` of a decode batch, or None if it does not fit any graph."""
        needed = ceil_div(max_context_len, self.block_size)
        if num_seqs > self.batch_sizes[-1] or needed > self.max_blocks:
            return None
        batch = next(b for b in self.batch_sizes if b >= num_seqs)
        return batch, min(1 << (needed - 1).bit_length(), self.max_blocks)

    def run(self, input_ids: list[int], positions: list[int], block_tables: list[list[int]],
            pending: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states ``[B, hidden]`` of a decode batch: sequence ``i`` computes ``input_ids[i]`` at
        ``positions[i]`` (its KV blocks ``block_tables[i]``); placeholder ids come from ``pending`` on the
        device (copied to a fixed buffer; the graph's first kernels run ``fill_pending``).  The result is a
        view of the graph's output, valid until the next ``run``.  Raises ``ValueError`` if no graph fits
        (see ``bucket``)."""
        num_seqs = len(input_ids)
        key = self.bucket(num_seqs, max(positions) + 1)
        if key is None:
            raise ValueError(f"DecodeGraphs: no graph for {num_seqs} sequences up to position {max(positions)}")
        batch, blocks = key
        host = self.staging.next()
        inputs = host[: 5 * batch].view(5, batch)
        tables = host[5 * batch : (5 + blocks) * batch].view(batch, blocks)
        self._stage_inputs(inputs.numpy(), input_ids, positions, block_tables)
        self._stage_tables(tables.numpy(), block_tables, key)
        self.inputs[:, :batch].copy_(inputs, non_blocking=True)
        self.block_tables[:batch, :blocks].copy_(tables, non_blocking=True)
        if pending is not None:
            self.pending[: len(pending)].copy_(pending)
        self.staging.queued()
        if key not in self.graphs:
            self.graphs[key] = self.capture(batch, blocks)
        graph, hidden = self.graphs[key]
        graph.replay()
        return hidden[:num_seqs]

    def forward(self, batch: int, blocks: int) -> torch.Tensor:
        """The decode forward over the first ``batch`` rows of the input buffers."""
        ids, positions, slots, context_lens, source_rows = self.inputs[:, :batch]
        fill_pending(ids, self.pending)
        meta = AttentionMetadata(
            query_start_loc=self.query_start_loc[: batch + 1],
            context_lens=context_lens,
            block_tables=self.block_tables[:batch, :blocks],
            slot_mapping=slots,
            max_query_len=1,
            max_context_len=blocks * self.block_size,
            kv_source_rows=source_rows,
        )
        return self.model(ids, positions, meta, self.kv_cache)

    def capture(self, batch: int, blocks: int) -> tuple[Graph, torch.Tensor]:
        """Warm up (this writes the same K/V the replay will), capture into the shared pool."""
        start = time.perf_counter()
        out = self.forward(batch, blocks)
        if not self.kv_cache.data.is_cuda:
            return RerunGraph(lambda: self.forward(batch, blocks), out), out
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, self.pool):
            hidden = self.forward(batch, blocks)
        if self.pool is None:
            self.pool = graph.pool()
        torch.cuda.synchronize(self.kv_cache.data.device)
        logger.info(
            "captured the decode CUDA graph of %d sequences x %d blocks in %.0f ms",
            batch, blocks, (time.perf_counter() - start) * 1e3,
        )  # fmt: skip
        return graph, hidden
