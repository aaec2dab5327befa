"""Prefill throughput against the GPU's matrix peak, in one run.

    python -m bench.prefill_roof --model /tmp/llama-3.1-8b-random --dtype bfloat16 --device cuda --batches 1,8

* peak: a bf16 (``--dtype``) matmul of ``--peak-size``^3, timed with CUDA events after warm-up, median of
  repeats: the matrix throughput this GPU reaches at all (the H200's is ~790 TFLOP/s dense bf16);
* prefill: ``B`` random prompts of ``--input-len`` tokens added to an ``LLMEngine`` at once and computed in ONE
  engine step (``--max-num-batched-tokens`` is raised to hold them; each asks one token), wall time of that
  step (it ends in a host copy of the sampled ids, so it is synchronous), the least of ``--repeats`` (each
  with fresh prompts: no prefix-cache hit);
* FLOPs of a prefill: 2 x (every weight a token multiplies, i.e. all parameters but the input embedding)
  per token, plus attention: 2 x 2 x heads x head_dim per (query, key) pair of the causal square
  (``L * (L + 1) / 2`` pairs per sequence of length ``L``), every layer;
* achieved TFLOP/s = FLOPs / step time, and its fraction of the peak.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from bench.decode_floor import sync
from common.engine.config import EngineConfig
from common.engine.engine import LLMEngine
from common.messages import SamplingParams

ONE_TOKEN = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


def matmul_peak(dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """FLOP/s of a ``size``^3 matmul on the current CUDA device (median of ``repeats``, CUDA events)."""
    a = torch.randn(size, size, dtype=dtype, device="cuda")
    b = torch.randn(size, size, dtype=dtype, device="cuda")
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * size**3 / statistics.median(times)


def prefill_flops(engine: LLMEngine, batch: int, length: int) -> float:
    """FLOPs of prefilling ``batch`` prompts of ``length`` tokens (see the module docstring)."""
    mc = engine.model_config
    embedding = mc.vocab_size * mc.hidden_size
    params = sum(p.numel() for p in engine.model.parameters())
    tied = mc.tie_word_embeddings
    matmul_params = params if tied else params - embedding  # a tied embedding is read once, as the LM head
    pairs = length * (length + 1) // 2
    attention = 4 * mc.num_layers * mc.num_heads * mc.head_dim * pairs
    return batch * (2 * matmul_params * length + attention)


def time_prefill(engine: LLMEngine, batch: int, length: int, seed: int) -> float:
    """Wall seconds of the one step that prefills ``batch`` fresh random prompts of ``length`` tokens."""
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    ids = [f"roof-{seed}-{i}" for i in range(batch)]
    for request_id in ids:
        engine.add_request(request_id, [rng.randrange(min(1000, vocab // 2), vocab) for _ in range(length)], ONE_TOKEN)
    sync(engine.device)
    start = time.perf_counter()
    outputs = engine.step()
    sync(engine.device)
    seconds = time.perf_counter() - start
    done = {out.request_id for out in outputs if out.finished}
    if done != set(ids):
        raise RuntimeError(f"one step prefilled {len(done)} of {batch} prompts: raise --max-num-batched-tokens")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="bfloat16", choices=("float16", "bfloat16"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", default="1,8", help="comma-separated prompt counts prefilled in one step")
    parser.add_argument("--input-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-size", type=int, default=8192)
    parser.add_argument("--attention-backend", default="auto", help="the engine's --attention-backend")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    dtype = getattr(torch, args.dtype)
    peak = matmul_peak(dtype, args.peak_size)
    engine = LLMEngine(EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, max_num_seqs=max(batches),
        max_num_batched_tokens=max(batches) * args.input_len, max_model_len=args.input_len + 16,
        kv_cache_memory="16GiB", enforce_eager=True, async_scheduling=False,  # the timed step returns its tokens
        enable_prefix_caching=False, attention_backend=args.attention_backend,
    ))  # fmt: skip
    print(f"{torch.cuda.get_device_name()}, {args.dtype}: matmul peak {peak / 1e12:.0f} TFLOP/s "
          f"({args.peak_size}^3); model {args.model}, attention backend {args.attention_backend}")
    print("| prompts x tokens | step ms | TFLOP/s | of peak |\n|---|---:|---:|---:|")
    for batch in batches:
        time_prefill(engine, batch, args.input_len, seed=-batch)  # warm-up: allocator, kernels' compilation
        seconds = min(time_prefill(engine, batch, args.input_len, seed=r * 100 + batch) for r in range(args.repeats))
        achieved = prefill_flops(engine, batch, args.input_len) / seconds
        print(f"| {batch} x {args.input_len} | {seconds * 1e3:.1f} | {achieved / 1e12:.0f} | {achieved / peak:.2f} |")


if __name__ == "__main__":
    main()
