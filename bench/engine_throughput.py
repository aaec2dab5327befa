"""Offline generation throughput: our LLMEngine against transformers ``generate`` in the same run.

The same batch (random prompt token ids, greedy, EOS ignored) goes through both,
on the same weights loaded from the same directory, dtype and device; the
ratio of output tokens/s is the figure.

    python -m bench.engine_throughput --model demo --num-requests 64 --input-len 128 --output-len 128
"""

from __future__ import annotations

import argparse
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


def run_engine(engine: LLMEngine, prompts: list[list[int]], output_len: int) -> tuple[float, list[list[int]]]:
    sampling = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    engine.generate([p[:8] for p in prompts[:2]], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    sync(engine.device)
    start = time.perf_counter()
    outputs = engine.generate(prompts, sampling)
    sync(engine.device)
    return time.perf_counter() - start, [o.new_token_ids for o in outputs]


@torch.inference_mode()
def run_transformers(path, prompts, output_len, dtype, device, pad_id: int) -> tuple[float, list[list[int]]]:
    """Batched ``generate``, left-padded, greedy, no EOS."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    kwargs = dict(do_sample=False, pad_token_id=pad_id, min_new_tokens=output_len, max_new_tokens=output_len)
    model.generate(ids[:2, :8], attention_mask=mask[:2, :8], **{**kwargs, "min_new_tokens": 2, "max_new_tokens": 2})
    sync(device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, **kwargs)
    sync(device)
    return time.perf_counter() - start, out[:, width:].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="model directory, hub id or 'demo'")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=("auto", "float32", "float16", "bfloat16"))
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    args = parser.parse_args()
    for name in ("num_requests", "input_len", "output_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    config = EngineConfig(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        max_num_seqs=args.num_requests,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=None,
    )
    engine = LLMEngine(config)
    device = resolve_device(args.device)
    special = set(engine.eos_token_ids) | {engine.model_config.bos_token_id or 0}
    prompts = make_prompts(args.num_requests, args.input_len, engine.model_config.vocab_size, special)
    total = args.num_requests * args.output_len

    ours_s, ours = run_engine(engine, prompts, args.output_len)
    path, dtype = resolve_model_path(args.model), engine.dtype
    del engine  # frees its KV cache before transformers loads
    theirs_s, theirs = run_transformers(path, prompts, args.output_len, dtype, device, pad_id=0)

    identical = sum(a == b for a, b in zip(ours, theirs))
    print(f"model {args.model} ({path}), {dtype} on {device}, torch threads {torch.get_num_threads()}")
    print(f"batch: {args.num_requests} requests x {args.input_len} prompt tokens -> {args.output_len} new tokens, "
          "greedy, EOS ignored")
    print(f"pdserve engine: {ours_s:8.2f} s  {total / ours_s:10.1f} output tokens/s")
    print(f"transformers  : {theirs_s:8.2f} s  {total / theirs_s:10.1f} output tokens/s")
    print(f"ratio         : {theirs_s / ours_s:.2f}x")
    print(f"identical greedy outputs: {identical}/{args.num_requests}")


if __name__ == "__main__":
    main()
