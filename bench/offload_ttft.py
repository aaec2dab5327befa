"""TTFT of a long prompt re-sent after other prompts evicted it from the KV cache: served from the
CPU offload tier (``--kv-offload-cpu-gib``) against recomputed, the same run, same weights and prompts.

Two engines hold just enough KV blocks for one prompt (``--prompt-len`` tokens + 1), one with the
offload tier.  Each repeat sends prompt A (one output token), then two other prompts of the same
length (A's blocks are evicted), then A again: the TTFT of that last A is measured (from
``add_request`` to its first token, stepping the engine directly: no HTTP, no asyncio).  The figure
is the ratio recompute / offload of the best TTFT of each side over ``--repeats`` (other prompts
each repeat); the cached tokens of each side are printed to show the hit (and the miss).

    python -m bench.offload_ttft --prompt-len 2048 --repeats 5                       # CPU, demo model
    python -m bench.offload_ttft --device cuda --dtype bfloat16 --model /path/to/model --offload-gib 4
"""

from __future__ import annotations

import argparse
import time

from bench.engine_throughput import make_prompts, sync
from common.engine.config import EngineConfig
from common.engine.engine import LLMEngine
from common.messages import SamplingParams

ONE_TOKEN = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


def ttft(engine: LLMEngine, request_id: str, prompt: list[int]) -> tuple[float, int]:
    """(seconds to the first token, cached tokens) of one request on an otherwise idle engine; then
    every copy the offload tier queued is finished, so the next request starts from a quiet engine."""
    sync(engine.device)
    start = time.perf_counter()
    engine.add_request(request_id, prompt, ONE_TOKEN)
    while True:
        out = next((o for o in engine.step() if o.request_id == request_id and o.finished), None)
        if out is not None:
            break
    sync(engine.device)
    seconds = time.perf_counter() - start
    while engine.has_work():
        engine.step()
    return seconds, out.num_cached_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="demo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--offload-gib", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    blocks = -(-(args.prompt_len + 1) // args.block_size) + 4
    common = dict(model=args.model, device=args.device, dtype=args.dtype, block_size=args.block_size,
                  num_kv_blocks=blocks, max_model_len=max(args.prompt_len + 16, 2 * args.block_size))
    sides = {"recompute": LLMEngine(EngineConfig(**common)),
             "offload": LLMEngine(EngineConfig(**common, kv_offload_cpu_gib=args.offload_gib))}
    vocab = sides["offload"].model_config.vocab_size
    special = set(sides["offload"].eos_token_ids)
    best = {name: float("inf") for name in sides}
    cached = {}
    for r in range(args.repeats + 1):  # repeat 0 warms up
        a, *others = make_prompts(3, args.prompt_len, vocab, special, seed=r)
        for name, engine in sides.items():
            ttft(engine, f"a-{r}", a)
            for i, other in enumerate(others):
                ttft(engine, f"evict-{r}-{i}", other)
            seconds, cached[name] = ttft(engine, f"a-again-{r}", a)
            if r:
                best[name] = min(best[name], seconds)
    for name in sides:
        print(f"{name:9s} best TTFT {best[name] * 1e3:8.1f} ms   cached tokens {cached[name]}")
    print(f"recompute / offload TTFT: {best['recompute'] / best['offload']:.2f}x "
          f"({args.prompt_len}-token prompt, {args.device}, {args.model}, best of {args.repeats})")


if __name__ == "__main__":
    main()
