"""Decode step time of ``LLMEngine`` against its floor: the bytes a step must read over measured bandwidth.

    python -m bench.decode_floor --model /tmp/llama-1b --dtype bfloat16 --device cuda --batch-sizes 1,32

* bandwidth: a large device-to-device copy (bytes read + written over time; CUDA
  events, after warm-up, median of repeats);
* floor of a decode step of B sequences: (weight bytes + the KV bytes their contexts
  hold) / bandwidth; weight bytes count every parameter once (a tied embedding is
  read once, as the LM head);
* step: time from one ``LLMEngine.step()``'s return to the next's with B sequences in
  decode, median over ``--steps`` after ``--warmup``.  A synchronous step ends in a
  host copy of the sampled ids (and a device sync here); with async scheduling
  (``--async-scheduling``, the engine's default on CUDA) a step returns with the next
  one in flight, so this is the steady-state period, nothing synchronized in between;
  the same batch is then also timed with synchronous steps (``sync_step_ms``: the
  same engine, ``async_scheduling`` switched off), the baseline of the same run;
* forward: the same decode batch's model forward + logits alone, run eagerly, and
  (CUDA) replayed from a CUDA graph: the gap says what launching costs;
* profile (CUDA, ``--profile-steps``): torch.profiler over engine steps: the GPU's busy
  time per step (the union of its kernels' intervals) and how many kernels a step
  launches.  ``gpu_busy`` is that busy time over the step's unprofiled wall time
  (``step_ms``); ``busy_prof`` over the profiled steps' own wall time, which the
  profiler's host-side cost per launch (tens of us at batch 1) stretches: a floor.

``--no-cudnn-attention`` runs everything with SDPA's cuDNN backend excluded: on an H100
(torch 2.11) cuDNN builds a new attention plan for every new key length, i.e. once per
decode step, which costs tens of milliseconds of CPU time.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from common.arith import ceil_div
from common.engine.attention import AttentionMetadata
from common.engine.config import EngineConfig
from common.engine.engine import LLMEngine
from common.engine.sequence import Sequence
from common.messages import SamplingParams

logger = logging.getLogger(__name__)

SYNC_WARMUP = 3  # steps after switching async scheduling off, before timing
NON_CUDNN_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class BatchResult:
    batch: int
    context_len: int
    step_s: float
    sync_step_s: float | None  # synchronous steps of the same batch when step_s is async; else None
    floor_s: float
    eager_forward_s: float
    graph_forward_s: float | None  # None: not CUDA, or capture failed
    gpu_busy_fraction: float | None  # device busy time per step / step_s; None: not profiled
    busy_profiled_fraction: float | None  # device busy time per step / the profiled steps' wall time
    kernels_per_step: float | None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: torch.device, nbytes: int, repeats: int = 20) -> float:
    """Bytes per second of a ``nbytes`` copy, counting bytes read plus bytes written (median of ``repeats``)."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - start)
    if not torch.equal(dst, src):
        raise RuntimeError("bandwidth copy: destination differs from source")
    return 2 * nbytes / statistics.median(times)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter, each counted once (``parameters()`` skips tied duplicates)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes(engine: LLMEngine, num_tokens: int) -> int:
    """KV bytes ``num_tokens`` cached positions occupy (all layers, K and V)."""
    return num_tokens * engine.kv_cache.block_bytes // engine.block_size


def start_decoding(engine: LLMEngine, batch: int, input_len: int, max_tokens: int, seed: int) -> list[Sequence]:
    """Add ``batch`` random-prompt requests and step until each has its first token (all in decode)."""
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    special = set(engine.eos_token_ids) | {engine.model_config.bos_token_id or 0}
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = [f"floor-{seed}-{i}" for i in range(batch)]
    for request_id in ids:
        prompt = [t for t in (rng.randrange(vocab) for _ in range(2 * input_len)) if t not in special][:input_len]
        engine.add_request(request_id, prompt, sampling)
    seqs = [engine.requests[request_id] for request_id in ids]
    while any(seq.num_output_tokens == 0 for seq in seqs):
        engine.step()
    return seqs


def time_steps(engine: LLMEngine, seqs: list[Sequence], n: int) -> list[float]:
    """Seconds from each of ``n`` engine steps' start (the previous one's return) to its return; every
    one must advance every sequence by one token.  Synchronous steps end with a device sync; with async
    scheduling nothing waits but the engine itself (see the module docstring)."""
    times = []
    sync(engine.device)
    start = time.perf_counter()
    for _ in range(n):
        before = [seq.num_tokens for seq in seqs]
        engine.step()
        if not engine.async_scheduling:
            sync(engine.device)
        now = time.perf_counter()
        times.append(now - start)
        start = now
        if [seq.num_tokens for seq in seqs] != [b + 1 for b in before]:
            raise RuntimeError("a timed step did not decode exactly one token per sequence (finished or preempted)")
    return times


def time_sync_steps(engine: LLMEngine, seqs: list[Sequence], args: argparse.Namespace) -> float | None:
    """Median synchronous step of the same batch, when the engine steps asynchronously (else None)."""
    if not engine.async_scheduling:
        return None
    engine.async_scheduling = False
    try:
        time_steps(engine, seqs, SYNC_WARMUP)
        return statistics.median(time_steps(engine, seqs, args.steps))
    finally:
        engine.async_scheduling = True


def decode_steps(args: argparse.Namespace) -> int:
    """Decode steps a batch may take: warm-up, timed (twice: async and synchronous), profiled, slack."""
    return 1 + args.warmup + 2 * (args.steps + SYNC_WARMUP) + args.profile_steps + 2


def decode_inputs(engine: LLMEngine, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """A decode batch that recomputes each sequence's last computed token (its KV already has a block)."""
    lens = [seq.num_computed_tokens for seq in seqs]
    meta = AttentionMetadata.build(
        [1] * len(seqs), lens, [seq.block_table for seq in seqs], engine.block_size, engine.device
    )
    ids = torch.tensor([seq.token_ids[n - 1] for seq, n in zip(seqs, lens)], device=engine.device)
    pos = torch.tensor([n - 1 for n in lens], device=engine.device)
    return ids, pos, meta


def forward_times(engine: LLMEngine, seqs: list[Sequence], repeats: int) -> tuple[float, float | None]:
    """Median seconds of the decode forward + logits: eager, and replayed from a CUDA graph (None off CUDA
    or if capture fails).  The graph's logits must equal the eager ones."""
    model, kv = engine.model, engine.kv_cache
    ids, pos, meta = decode_inputs(engine, seqs)

    def forward() -> torch.Tensor:
        return model.compute_logits(model(ids, pos, meta, kv))

    eager = []
    for i in range(repeats + 3):
        start = time.perf_counter()
        reference = forward()
        sync(engine.device)
        if i >= 3:
            eager.append(time.perf_counter() - start)
    if engine.device.type != "cuda":
        return statistics.median(eager), None
    try:
        stream = torch.cuda.Stream(engine.device)
        stream.wait_stream(torch.cuda.current_stream(engine.device))
        with torch.cuda.stream(stream):
            forward()
        torch.cuda.current_stream(engine.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = forward()
    except RuntimeError as e:
        logger.warning("CUDA graph capture of the decode forward failed: %s", e)
        return statistics.median(eager), None
    graph.replay()
    sync(engine.device)
    if not torch.equal(logits.argmax(-1), reference.argmax(-1)):
        raise RuntimeError("CUDA graph replay picks other tokens than the eager forward")
    replays = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        replays.append(begin.elapsed_time(end) / 1e3)
    return statistics.median(eager), statistics.median(replays)


def profile_steps(engine: LLMEngine, seqs: list[Sequence], n: int, trace: Path | None
                  ) -> tuple[float, float, float, str]:
    """(GPU busy seconds per step, the profiled steps' wall seconds per step, kernels per step, top-kernels
    table) over ``n`` steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        time_steps(engine, seqs, n)
        wall_us = (time.perf_counter() - start) * 1e6
    device_events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    intervals = sorted((e.time_range.start, e.time_range.end) for e in device_events)
    busy_us, reach = 0.0, float("-inf")
    for begin, end in intervals:  # length of the union of the device intervals
        if end > reach:
            busy_us += end - max(begin, reach)
            reach = end
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60)
    return busy_us / n / 1e6, wall_us / n / 1e6, len(device_events) / n, table


def measure_batch(engine: LLMEngine, batch: int, args: argparse.Namespace, bandwidth: float) -> BatchResult:
    profiled = args.profile_steps if engine.device.type == "cuda" else 0
    seqs = start_decoding(engine, batch, args.input_len, decode_steps(args), seed=batch)
    time_steps(engine, seqs, args.warmup)
    steps = time_steps(engine, seqs, args.steps)
    sync_step_s = time_sync_steps(engine, seqs, args)
    context = statistics.mean(seq.num_tokens for seq in seqs)  # context after the timed steps: the KV term is an upper bound
    eager_s, graph_s = forward_times(engine, seqs, repeats=20)
    busy = busy_profiled = kernels = None
    if profiled:
        trace = args.trace_dir / f"decode_b{batch}.json" if args.trace_dir else None
        busy_s, profiled_wall_s, kernels, table = profile_steps(engine, seqs, profiled, trace)
        busy, busy_profiled = busy_s / statistics.median(steps), busy_s / profiled_wall_s
        print(f"--- profile, batch {batch}: kernels by device time over {profiled} steps")
        print(table)
    for seq in seqs:
        engine.abort(seq.request_id)
    engine.step()  # hands out the aborts
    floor = (weight_bytes(engine.model) + kv_bytes(engine, int(context) * batch)) / bandwidth
    return BatchResult(batch, int(context), statistics.median(steps), sync_step_s, floor, eager_s, graph_s, busy,
                       busy_profiled, kernels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory, hub id or 'demo'")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--batch-sizes", default="1", help="comma-separated numbers of sequences in decode")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens of each sequence")
    parser.add_argument("--warmup", type=int, default=10, help="decode steps before timing")
    parser.add_argument("--steps", type=int, default=100, help="timed decode steps (median reported)")
    parser.add_argument("--profile-steps", type=int, default=10, help="steps under torch.profiler on CUDA (0: none)")
    parser.add_argument("--trace-dir", type=Path, default=None, help="write a Chrome trace per batch size here")
    parser.add_argument("--attention-backend", default="auto", choices=("auto", "torch", "triton"),
                        help="the engine's --attention-backend (auto: triton on CUDA when installed)")
    parser.add_argument("--no-cudnn-attention", action="store_true", help="exclude SDPA's cuDNN backend (the proposed fix)")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                        help="the engine's --async-scheduling (default: on with CUDA); on: sync_step_ms too")
    parser.add_argument("--bandwidth-mib", type=int, default=2048, help="size of the bandwidth copy in MiB")
    args = parser.parse_args()
    try:
        batches = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes: {args.batch_sizes!r} is not a comma-separated list of integers")
    for name, value, least in (("batch-sizes", min(batches), 1), ("input-len", args.input_len, 1),
                               ("warmup", args.warmup, 0), ("steps", args.steps, 1),
                               ("profile-steps", args.profile_steps, 0), ("bandwidth-mib", args.bandwidth_mib, 1)):  # fmt: skip
        if value < least:
            parser.error(f"--{name} must be >= {least}")
    if args.trace_dir:
        args.trace_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    max_len = args.input_len + decode_steps(args)
    block_size = 16
    engine = LLMEngine(
        EngineConfig(
            model=args.model,
            dtype=args.dtype,
            device=args.device,
            max_num_seqs=max(batches),
            max_model_len=max_len,
            num_kv_blocks=max(batches) * ceil_div(max_len, block_size) + 1,
            block_size=block_size,
            attention_backend=args.attention_backend,
            async_scheduling=args.async_scheduling,
        )
    )
    device = engine.device
    bandwidth = measure_bandwidth(device, args.bandwidth_mib << 20)
    weights = weight_bytes(engine.model)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    with sdpa_kernel(NON_CUDNN_SDPA) if args.no_cudnn_attention else nullcontext():
        results = [measure_batch(engine, batch, args, bandwidth) for batch in batches]

    sdpa = "cuDNN excluded" if args.no_cudnn_attention else "default backends"
    print(f"device {name}, torch {torch.__version__}, {engine.dtype_name}, model {args.model}, SDPA {sdpa}, "
          f"attention backend {engine.attention_backend}, "
          f"async scheduling {'on' if engine.async_scheduling else 'off'}")
    print(f"memory bandwidth (read + write, {args.bandwidth_mib} MiB copy): {bandwidth / 1e12:.3f} TB/s")
    print(f"weights: {weights / 1e9:.3f} GB ({sum(p.numel() for p in engine.model.parameters()) / 1e9:.3f} B params)")
    print("batch  context  step_ms  sync_step_ms  floor_ms  step/floor  eager_fwd_ms  graph_fwd_ms  gpu_busy  "
          "busy_prof  kernels/step")
    for r in results:
        sync_step = f"{r.sync_step_s * 1e3:12.3f}" if r.sync_step_s is not None else f"{'-':>12}"
        graph = f"{r.graph_forward_s * 1e3:12.3f}" if r.graph_forward_s is not None else f"{'-':>12}"
        busy = f"{r.gpu_busy_fraction:8.1%}" if r.gpu_busy_fraction is not None else f"{'-':>8}"
        busy_prof = f"{r.busy_profiled_fraction:9.1%}" if r.busy_profiled_fraction is not None else f"{'-':>9}"
        kernels = f"{r.kernels_per_step:12.0f}" if r.kernels_per_step is not None else f"{'-':>12}"
        print(
            f"{r.batch:5d}  {r.context_len:7d}  {r.step_s * 1e3:7.3f}  {sync_step}  {r.floor_s * 1e3:8.3f}  "
            f"{r.step_s / r.floor_s:9.2f}x  {r.eager_forward_s * 1e3:12.3f}  {graph}  {busy}  {busy_prof}  {kernels}"
        )


if __name__ == "__main__":
    main()
