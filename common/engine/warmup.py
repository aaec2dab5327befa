"""Warm-up before serving (CUDA): what would otherwise stall the first requests runs at start-up.

The first launch of each Triton kernel compiles it (a second or more), and each decode CUDA-graph bucket
``(batch, blocks)`` is captured on its first use.  ``warm_up`` runs one prefill step of the largest chunk the
scheduler may send, samples its logits (the sampler's kernels are not part of a step's forward), then a decode
step of every graph bucket (eagerly, once, where graphs are off), over dummy tokens in the cache's first
blocks: nothing is allocated in the block manager, and those blocks are free, so whatever K/V the steps write
there is overwritten before any request reads it.  Call it before the first request, never while requests
hold blocks.  Kernels see the same pointer alignment whatever the batch (``host_copies.to_device_aligned``), so
the variants compiled here are the ones serving uses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from common.arith import ceil_div
from common.engine.cuda_graph import DecodeGraphs
from common.engine.model_runner import ModelRunner, StepInputs

logger = logging.getLogger(__name__)


def warm_up(runner: ModelRunner, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int,
            call: Callable[[Callable[[], object]], object] = lambda fn: fn(),
            sample: Callable[[torch.Tensor], object] | None = None) -> float:
    """Run the warm-up steps through ``runner.execute`` (every tensor-parallel rank runs them) wrapped in
    ``call`` (the engine's ``WorkerRanks.call`` under TP), ``sample`` on the prefill's logits; returns the
    seconds it took."""
    start = time.perf_counter()
    block_size, num_blocks = runner.kv_cache.block_size, runner.kv_cache.num_blocks
    tokens = min(max_num_batched_tokens, max_model_len - 1, num_blocks * block_size)
    prefill = _prefill(tokens, block_size)
    logits = call(lambda: runner.execute(prefill))
    if sample is not None:
        sample(logits)
    graphs = runner.graphs
    if graphs is None:
        decodes = [_decode(max_num_seqs, 1, block_size, max_model_len)]
    else:
        decodes = [_decode(batch, blocks, block_size, max_model_len)
                   for batch in graphs.batch_sizes for blocks in _block_buckets(graphs, num_blocks)]
    for inputs in decodes:
        call(lambda inputs=inputs: runner.execute(inputs))
    runner.synchronize()
    seconds = time.perf_counter() - start
    captured = 0 if graphs is None else len(graphs.graphs)
    logger.info("warm-up: a prefill of %d tokens and %d decode graphs in %.1f s", tokens, captured, seconds)
    return seconds


def _block_buckets(graphs: DecodeGraphs, num_blocks: int) -> list[int]:
    """Every ``blocks`` value ``DecodeGraphs.bucket`` can return that fits the cache."""
    top = min(graphs.max_blocks, num_blocks)
    return sorted({b for b in (1 << i for i in range(top.bit_length())) if b <= top} | {top})


def _prefill(tokens: int, block_size: int) -> StepInputs:
    table = list(range(ceil_div(tokens, block_size)))
    return StepInputs([0] * tokens, list(range(tokens)), [tokens], [tokens], [table], [True])


def _decode(batch: int, blocks: int, block_size: int, max_model_len: int) -> StepInputs:
    """``batch`` sequences at the last position of ``blocks`` blocks (at most the model's last position),
    all in blocks ``0..blocks-1``."""
    position = min(blocks * block_size, max_model_len) - 1
    return StepInputs([0] * batch, [position] * batch, [1] * batch, [position + 1] * batch,
                      [list(range(blocks))] * batch, [True] * batch)
