"""Offline generation throughput: our LLMEngine against transformers ``generate`` in the same run.

The same batch (random prompt token ids, greedy, EOS ignored) goes through both,
on the same weights loaded from the same directory, dtype and device; the
ratio of output tokens/s is the figure.  Each first runs a warm-up batch of the
same shape (other prompts, so no prefix-cache hits; 2 new tokens): on CUDA that
captures the decode CUDA graphs the timed batch replays (``--enforce-eager``: none).
With ``--repeats N`` each side runs N batches (other prompts each, the same for both
sides) and the best time of each side makes the ratio: on a shared, noisy machine the
best of several runs is the least disturbed one.

    python -m bench.engine_throughput --model demo --num-requests 64 --input-len 128 --output-len 128
"""

from __future__ import annotations

import argparse
import logging
import random
import time

import torch

from common.engine.config import EngineConfig
from common.engine.engine import LLMEngine, resolve_device
from common.engine.loader import resolve_model_path
from common.messages import SamplingParams


def make_prompts(num: int, length: int, vocab: int, special: set[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    usable = [t for t in range(vocab) if t not in special]
    return [[rng.choice(usable) for _ in range(length)] for _ in range(num)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_engine(
    engine: LLMEngine, batches: list[list[list[int]]], warmup: list[list[int]], output_len: int
) -> tuple[list[float], list[list[list[int]]]]:
    """Seconds and output tokens of each batch."""
    sampling = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    engine.generate(warmup, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    times, outputs = [], []
    for prompts in batches:
        sync(engine.device)
        start = time.perf_counter()
        out = engine.generate(prompts, sampling)
        sync(engine.device)
        times.append(time.perf_counter() - start)
        outputs.append([o.new_token_ids for o in out])
    return times, outputs


@torch.inference_mode()
def run_transformers(
    path, batches, warmup, output_len, dtype, device, pad_id: int
) -> tuple[list[float], list[list[list[int]]]]:
    """Batched ``generate``, left-padded, greedy, no EOS: seconds and output tokens of each batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None

    def padded(batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=device)
        return ids, torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)

    kwargs = dict(do_sample=False, pad_token_id=pad_id, min_new_tokens=output_len, max_new_tokens=output_len)
    warm_ids, warm_mask = padded(warmup)
    model.generate(warm_ids, attention_mask=warm_mask, **{**kwargs, "min_new_tokens": 2, "max_new_tokens": 2})
    times, outputs = [], []
    for prompts in batches:
        ids, mask = padded(prompts)
        sync(device)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, **kwargs)
        sync(device)
        times.append(time.perf_counter() - start)
        outputs.append(out[:, ids.shape[1] :].tolist())
    return times, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="model directory, hub id or 'demo'")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=("auto", "float32", "float16", "bfloat16"))
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs in our engine")
    parser.add_argument("--attention-backend", default="auto", choices=("auto", "torch", "triton"),
                        help="our engine's --attention-backend (auto: triton on CUDA when installed)")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                        help="our engine's --async-scheduling (default: on with CUDA)")
    parser.add_argument("--repeats", type=int, default=1, help="batches per side; the best time of each is compared")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("num_requests", "input_len", "output_len", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    config = EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        max_num_seqs=args.num_requests,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=None,
        enforce_eager=args.enforce_eager,
        attention_backend=args.attention_backend,
        async_scheduling=args.async_scheduling,
    )
    engine = LLMEngine(config)
    device = resolve_device(args.device)
    special = set(engine.eos_token_ids) | {engine.model_config.bos_token_id or 0}
    vocab = engine.model_config.vocab_size
    batches = [make_prompts(args.num_requests, args.input_len, vocab, special, seed=i) for i in range(args.repeats)]
    warmup = make_prompts(args.num_requests, args.input_len, vocab, special, seed=args.repeats)
    total = args.num_requests * args.output_len

    ours_times, ours = run_engine(engine, batches, warmup, args.output_len)
    path, dtype = resolve_model_path(args.model), engine.dtype
    mode = "decode CUDA graphs" if engine.runner.graphs is not None else "eager"
    mode += ", async scheduling" if engine.async_scheduling else ", synchronous steps"
    del engine  # frees its KV cache before transformers loads
    theirs_times, theirs = run_transformers(path, batches, warmup, args.output_len, dtype, device, pad_id=0)

    ours_s, theirs_s = min(ours_times), min(theirs_times)
    identical = sum(a == b for mine, ref in zip(ours, theirs) for a, b in zip(mine, ref))
    print(f"model {args.model} ({path}), {dtype} on {device}, torch threads {torch.get_num_threads()}")
    print(f"batch: {args.num_requests} requests x {args.input_len} prompt tokens -> {args.output_len} new tokens, "
          "greedy, EOS ignored")
    print(f"pdserve engine: {ours_s:8.2f} s  {total / ours_s:10.1f} output tokens/s  ({mode})")
    print(f"transformers  : {theirs_s:8.2f} s  {total / theirs_s:10.1f} output tokens/s")
    print(f"ratio         : {theirs_s / ours_s:.2f}x")
    if args.repeats > 1:
        print(f"best of {args.repeats}; all times (s): pdserve {' '.join(f'{t:.2f}' for t in ours_times)}, "
              f"transformers {' '.join(f'{t:.2f}' for t in theirs_times)}")
    print(f"identical greedy outputs: {identical}/{args.num_requests * args.repeats}")


if __name__ == "__main__":
    main()
