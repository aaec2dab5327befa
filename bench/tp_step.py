"""Decode step time at each tensor-parallel size against TP 1: same script, same run, the ratio.

    python -m bench.tp_step --models demo,/tmp/llama-1b --tp-sizes 1,2 --batch-sizes 1,8 --device cpu

For each model and TP size one ``LLMEngine`` (TP > 1: rank 0 here, the other ranks
``common/engine/tp_workers.py`` processes, gloo on CPU, NCCL on CUDA from ``--device`` on)
puts ``batch`` random prompts of ``--input-len`` tokens into decode, runs ``--warmup``
steps, then times ``--steps`` steps (``bench.decode_floor.time_steps``: each must advance
every sequence by one token), ``--repeats`` times; the least of the medians is the figure
(on a shared, noisy machine the least disturbed window).  Engines run one after the other,
each closed before the next opens, so one copy of the weights is in memory at a time.  The
load average at the start and the end is printed: on a shared machine it says how loud the
noise was.

On CPU every rank gets ``cpu_count // TP`` threads: the workers take that share themselves,
and this script sets it for rank 0, so TP 2 and TP 1 use the same cores.  TP > 1 runs
eagerly; ``--enforce-eager`` makes TP 1 eager too (on CUDA, for a like-for-like ratio).  Every
engine steps synchronously (TP > 1 always does; TP 1 here without ``--async-scheduling``).

``--check-tokens N``: each engine also generates N greedy tokens (EOS ignored) for
``CHECK_PROMPTS`` random prompts, which must equal TP 1's token for token; the script
says where they first differ and exits 1 if any do.

On CUDA each step is also set against its floor at that TP size: the bytes one rank reads in a step
(its share of the weights plus its KV heads of every cached token) over the device copy bandwidth
measured at the start (``bench.decode_floor``), since the ranks read their shares at once.
``--prefill-batches B1,B2``: each TP size also times the one engine step that prefills B fresh
prompts of ``--input-len`` tokens (``bench.prefill_roof.time_prefill``; least of ``--repeats``).

Prints a markdown table per model: batch, the step time at each TP size, and each
size's time over TP 1's (then floors and prefill times where measured); ``--json`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.decode_floor import kv_bytes, measure_bandwidth, start_decoding, time_steps, weight_bytes
from bench.engine_throughput import make_prompts
from bench.prefill_roof import time_prefill
from common.arith import ceil_div
from common.engine.config import EngineConfig
from common.engine.engine import LLMEngine
from common.messages import SamplingParams

BLOCK_SIZE = 16
CHECK_PROMPTS = 4


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers >= 1")
    return values


@dataclass(slots=True)
class Run:
    """What one TP size measured."""

    step_s: dict[int, float]  # batch size -> decode step seconds (the least window median)
    floor_s: dict[int, float]  # batch size -> one rank's bytes over the bandwidth (CUDA only, else empty)
    prefill_s: dict[int, float]  # prompts -> seconds of the step prefilling them (--prefill-batches)
    greedy: list[list[int]]  # the greedy check's tokens, per prompt ([] without --check-tokens)


def greedy_tokens(engine: LLMEngine, n: int, input_len: int) -> list[list[int]]:
    """``n`` greedy tokens (EOS ignored) for each of ``CHECK_PROMPTS`` seeded random prompts ([] when n is 0)."""
    if n == 0:
        return []
    mc = engine.model_config
    prompts = make_prompts(CHECK_PROMPTS, input_len, mc.vocab_size, {*engine.eos_token_ids, mc.bos_token_id or 0})
    outputs = engine.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    return [out.new_token_ids for out in outputs]


def first_difference(tokens: list[list[int]], reference: list[list[int]]) -> str:
    """'' when ``tokens`` equal ``reference``, else 'prompt i from token k' of the first difference."""
    for i, (got, want) in enumerate(zip(tokens, reference)):
        if got != want:
            k = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            return f"prompt {i} from token {k}"
    return ""


def max_new_tokens(args: argparse.Namespace) -> int:
    return 1 + max(args.warmup + args.repeats * args.steps + 2, args.check_tokens)


def open_engine(model: str, tp: int, args: argparse.Namespace) -> LLMEngine:
    """A TP ``tp`` engine of ``model`` with room for the largest batch through warm-up, timing and the check."""
    max_len = args.input_len + max_new_tokens(args)
    batch = max([*args.batch_sizes, *args.prefill_batches])
    return LLMEngine(EngineConfig(
        model=model, dtype=args.dtype, device=args.device, tensor_parallel_size=tp, max_num_seqs=batch,
        max_model_len=max_len, block_size=BLOCK_SIZE, num_kv_blocks=batch * ceil_div(max_len, BLOCK_SIZE) + 1,
        max_num_batched_tokens=batch * args.input_len, enforce_eager=args.enforce_eager,
        async_scheduling=False,  # as TP > 1 steps: a like-for-like ratio
    ))  # fmt: skip


def use_threads(engine: LLMEngine) -> None:
    """On CPU, give rank 0 (this process) the share of the cores each worker rank takes itself."""
    if engine.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // engine.tp.world_size))


def measure(model: str, tp: int, args: argparse.Namespace, bandwidth: float | None) -> Run:
    """Step times (and floors with a ``bandwidth``), prefill times and greedy tokens of a TP ``tp`` engine
    of ``model``, closed afterwards."""
    engine = open_engine(model, tp, args)
    try:
        use_threads(engine)
        step_s, floor_s = {}, {}
        for batch in args.batch_sizes:
            seqs = start_decoding(engine, batch, args.input_len, max_new_tokens(args), seed=batch)
            time_steps(engine, seqs, args.warmup)
            step_s[batch] = min(statistics.median(time_steps(engine, seqs, args.steps)) for _ in range(args.repeats))
            if bandwidth:
                cached = sum(seq.num_computed_tokens for seq in seqs)
                floor_s[batch] = (weight_bytes(engine.model) + kv_bytes(engine, cached)) / bandwidth
            for seq in seqs:
                engine.abort(seq.request_id)
            engine.step()  # hands out the aborts
        prefill_s = {}
        for b in args.prefill_batches:
            time_prefill(engine, b, args.input_len, seed=-b)  # warm-up: this shape's kernels and allocations
            prefill_s[b] = min(time_prefill(engine, b, args.input_len, seed=100 * b + r) for r in range(args.repeats))
        return Run(step_s, floor_s, prefill_s, greedy_tokens(engine, args.check_tokens, args.input_len))
    finally:
        engine.close()


def table(model: str, runs: dict[int, Run], batches: list[int], input_len: int) -> str:
    """Markdown: one row per batch size, ms per TP size, then each size's ratio to TP 1."""
    others = [tp for tp in runs if tp != 1]
    head = ["batch", *(f"TP{tp} ms" for tp in runs), *(f"TP{tp}/TP1" for tp in others)]
    rows = [f"| {' | '.join(head)} |", f"|{'---:|' * len(head)}"]
    for batch in batches:
        cells = [str(batch), *(f"{run.step_s[batch] * 1e3:.2f}" for run in runs.values())]
        cells += [f"{runs[tp].step_s[batch] / runs[1].step_s[batch]:.2f}" for tp in others]
        if runs[1].floor_s:
            cells += [f"{run.floor_s[batch] * 1e3:.2f} ({run.step_s[batch] / run.floor_s[batch]:.2f}x)"
                      for run in runs.values()]
        rows.append(f"| {' | '.join(cells)} |")
    if runs[1].floor_s:
        rows[0] = rows[0][:-2] + " | " + " | ".join(f"TP{tp} floor ms (step/floor)" for tp in runs) + " |"
        rows[1] += "---:|" * len(runs)
    for b in runs[1].prefill_s:
        times = " | ".join(f"TP{tp} {run.prefill_s[b] * 1e3:.1f} ms" for tp, run in runs.items())
        ratios = " | ".join(f"TP{tp}/TP1 {runs[tp].prefill_s[b] / runs[1].prefill_s[b]:.2f}" for tp in others)
        rows.append(f"\nprefill of {b} x {input_len} tokens: {times} | {ratios}")
    return f"{model}\n\n" + "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="demo", help="comma-separated model directories or 'demo'")
    parser.add_argument("--tp-sizes", type=int_list, default=[1, 2], help="TP sizes, comma-separated (1 is added)")
    parser.add_argument("--batch-sizes", type=int_list, default=[1, 8], help="sequences in decode, comma-separated")
    parser.add_argument("--input-len", type=int, default=64, help="prompt tokens of each sequence")
    parser.add_argument("--warmup", type=int, default=5, help="decode steps before timing")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps of a window (its median counts)")
    parser.add_argument("--repeats", type=int, default=3, help="windows of --steps per batch (the least median "
                        "is reported)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (TP N uses N GPUs from it)")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs at TP 1 either")
    parser.add_argument("--check-tokens", type=int, default=0, help="greedy tokens each TP size must share "
                        "with TP 1 (0: no check)")
    parser.add_argument("--prefill-batches", type=int_list, default=[], help="also time the prefill step of "
                        "this many --input-len prompts, comma-separated")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    for name, value, least in (("input-len", args.input_len, 1), ("warmup", args.warmup, 0), ("steps", args.steps, 1),
                               ("repeats", args.repeats, 1), ("check-tokens", args.check_tokens, 0)):  # fmt: skip
        if value < least:
            parser.error(f"--{name} must be >= {least}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sizes = sorted({1, *args.tp_sizes})
    models = [m for m in args.models.split(",") if m]
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)"
    print(f"device {name}, torch {torch.__version__}, dtype {args.dtype}, input {args.input_len} tokens, "
          f"least of {args.repeats} medians of {args.steps} steps after {args.warmup}, "
          f"load average {os.getloadavg()[0]:.2f}")
    bandwidth = measure_bandwidth(torch.device(args.device), 2 << 30) if args.device.startswith("cuda") else None
    if bandwidth:
        print(f"device copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + written)")
    figures, differences = {}, []
    for model in models:
        runs = {tp: measure(model, tp, args, bandwidth) for tp in sizes}
        print("\n" + table(model, runs, args.batch_sizes, args.input_len), flush=True)
        figures[model] = {f"tp{tp}": {"step_ms": {str(b): s * 1e3 for b, s in run.step_s.items()},
                                      "floor_ms": {str(b): s * 1e3 for b, s in run.floor_s.items()},
                                      "prefill_ms": {str(b): s * 1e3 for b, s in run.prefill_s.items()}}
                          for tp, run in runs.items()}
        if not args.check_tokens:
            continue
        for tp in sizes[1:]:
            where = first_difference(runs[tp].greedy, runs[1].greedy)
            print(f"greedy check, {args.check_tokens} tokens x {CHECK_PROMPTS} prompts: TP{tp} "
                  + (f"DIFFERS from TP1 at {where}" if where else "equals TP1"), flush=True)
            if where:
                differences.append(f"{model} TP{tp}: {where}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "args": {k: str(v) for k, v in vars(args).items()},
                                         "step_ms": figures, "greedy_differences": differences}, indent=1))
    if differences:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
