"""Issue 18: push mode vs read mode on the same workload — TTFT and the first inter-token gap, as a client sees them.

Starts a registry and two P/D pairs on one device, each a prefill and a decode with the same flags: one in
read mode (served as model ``read``) and one with ``--kv-mode push`` (model ``push``).  The client plays
the gateway with ``bench.engine_driver.EngineDriver``:

* read: prefill leg, the first token arrives with ``kv_transfer``; then the decode leg reads the KV and
  streams tokens 2..;
* push: the decode leg first (its registration), then the prefill leg with ``push_to``: prefill writes
  each chunk's KV into decode's blocks as it computes it, the first token arrives once the last write
  landed, and decode streams tokens 2.. at once.

TTFT runs from the request's first message to the first token; the gap from the first token to the
second.  Each level of concurrency (``--concurrency``, e.g. ``1,8``) runs ``--requests`` requests per mode
(fresh prompts of ``--prompt-len`` tokens, ``--max-tokens`` greedy tokens), read and push phases
alternating, each after ``--warmup`` unmeasured ones; prompts are chunked by the engines'
``--max-num-batched-tokens`` (``--chunk``), which is what push overlaps its writes with.  Prints p50 and
mean of both, and push/read ratios of the p50s.

    python -m bench.push_vs_read --device cpu
    python -m bench.push_vs_read --device cuda --kv-transport nvlink --model /tmp/ckpt --prompt-len 4096 \\
        --chunk 1024 --engine-args "--max-model-len 8192"
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import statistics
import time

from bench.cli import bench_parser, run_bench
from bench.engine_driver import EngineDriver, prompt_ids
from bench.pd_identity import add_engine_args
from bench.processes import Processes
from bench.serving_stats import percentile
from common.messages import Generate, SamplingParams

MODES = ("read", "push")


async def start_pairs(procs: Processes, args: argparse.Namespace) -> None:
    """A read-mode and a push-mode pair: ``prefill-read``, ``decode-read``, ``prefill-push``, ``decode-push``."""
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    procs.start_registry()
    for mode in MODES:
        flags = ["--model", args.model, "--served-model-name", mode, "--device", args.device, "--dtype", dtype,
                 "--kv-mode", mode, "--max-num-batched-tokens", str(args.chunk), *shlex.split(args.engine_args)]
        for role, extra in (("prefill", args.prefill_args), ("decode", args.decode_args)):
            procs.start_engine(f"{role}-{mode}", role, *flags, *shlex.split(extra), num_kv_blocks=args.num_kv_blocks,
                               kv_transport=args.kv_transport)
    await procs.wait_registered(*(f"{r}-{m}" for m in MODES for r in ("prefill", "decode")),
                                timeout_s=args.ready_timeout_s)


async def read_request(driver: EngineDriver, rid: str, ids: list[int], sampling: SamplingParams) -> tuple[float, float]:
    """(TTFT, first gap) of one read-mode request, in seconds."""
    started = time.perf_counter()
    first = params = None
    async for out in driver.client("prefill-read").stream(Generate(rid, sampling, prompt_token_ids=ids,
                                                                   do_remote_decode=True)):
        if out.token_ids and first is None:
            first = time.perf_counter()
        params = out.kv_transfer or params
    second = None
    async for out in driver.client("decode-read").stream(Generate(rid, sampling, prompt_token_ids=ids,
                                                                  remote_prefill=params)):
        if out.token_ids and second is None:
            second = time.perf_counter()
    return first - started, second - first


async def push_request(driver: EngineDriver, rid: str, ids: list[int], sampling: SamplingParams,
                       prefill: str = "prefill-push", decode: str = "decode-push") -> tuple[float, float]:
    """(TTFT, first gap) of one push-mode request on the engines named ``prefill`` and ``decode``, in seconds:
    the decode leg first (its first output the ``PushTarget``), then the prefill leg writing into its blocks."""
    started = time.perf_counter()
    decoded = aiter(driver.client(decode).stream(Generate(rid, sampling, prompt_token_ids=ids, await_push=True)))
    target = (await anext(decoded)).push_target
    second: list[float] = []

    async def decode_leg() -> None:
        async for out in decoded:
            if out.token_ids and not second:
                second.append(time.perf_counter())

    decoding = asyncio.create_task(decode_leg())
    first = None
    async for out in driver.client(prefill).stream(Generate(rid, sampling, prompt_token_ids=ids,
                                                            do_remote_decode=True, push_to=target)):
        if out.token_ids and first is None:
            first = time.perf_counter()
    await decoding
    return first - started, second[0] - first


async def phase(driver: EngineDriver, mode: str, args: argparse.Namespace, concurrency: int, seed: int
                ) -> list[tuple[float, float]]:
    """``--requests`` measured requests of ``mode`` on ``concurrency`` workers (after the warmup)."""
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    one = read_request if mode == "read" else push_request
    for i in range(args.warmup):
        await one(driver, f"{mode}-warm-{seed}-{i}", prompt_ids(args.prompt_len, seed=seed - 1 - i), sampling)
    todo = iter(range(args.requests))
    rows: list[tuple[float, float]] = []

    async def worker() -> None:
        for i in todo:
            rows.append(await one(driver, f"{mode}-{seed}-{i}", prompt_ids(args.prompt_len, seed=seed + i), sampling))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return rows


def summary_ms(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1e3 for s in seconds]
    return {"p50_ms": percentile(ms, 50), "mean_ms": statistics.fmean(ms)}


async def run(args: argparse.Namespace) -> dict:
    results = []
    async with Processes() as procs:
        await start_pairs(procs, args)
        driver = EngineDriver(procs.engine_endpoints(), timeout_s=300.0)
        try:
            for level, concurrency in enumerate(args.concurrency):
                rows = {}
                for k, mode in enumerate(MODES if level % 2 == 0 else MODES[::-1]):
                    rows[mode] = await phase(driver, mode, args, concurrency, seed=10**6 * (1 + level) + 10**5 * k)
                entry = {"concurrency": concurrency}
                for mode in MODES:
                    entry[mode] = {"ttft": summary_ms([r[0] for r in rows[mode]]),
                                   "first_gap": summary_ms([r[1] for r in rows[mode]])}
                for metric in ("ttft", "first_gap"):
                    entry[f"{metric}_push_over_read"] = entry["push"][metric]["p50_ms"] / entry["read"][metric]["p50_ms"]
                results.append(entry)
        finally:
            await driver.close()
    return {"setup": {k: v for k, v in vars(args).items() if k != "json"}, "levels": results}


def report(result: dict) -> str:
    s = result["setup"]
    lines = [f"push vs read: {s['requests']} requests per mode and level, prompts of {s['prompt_len']} tokens in "
             f"chunks of {s['chunk']}, {s['max_tokens']} new tokens, {s['device']}, model {s['model']}, "
             f"KV over {s['kv_transport']}",
             f"{'in flight':>9} {'mode':>5} {'TTFT p50':>9} {'mean':>8} {'gap p50':>8} {'mean':>8}  (ms)"]
    for entry in result["levels"]:
        for mode in MODES:
            t, g = entry[mode]["ttft"], entry[mode]["first_gap"]
            lines.append(f"{entry['concurrency']:9d} {mode:>5} {t['p50_ms']:9.2f} {t['mean_ms']:8.2f} "
                         f"{g['p50_ms']:8.2f} {g['mean_ms']:8.2f}")
        lines.append(f"{'':9} push/read p50: TTFT {entry['ttft_push_over_read']:.2f}x, first gap "
                     f"{entry['first_gap_push_over_read']:.2f}x")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    add_engine_args(p)
    p.set_defaults(kv_transport="auto", num_kv_blocks=1024)  # room for --concurrency prompts on each decode
    p.add_argument("--chunk", type=int, default=256, help="engines' --max-num-batched-tokens (default 256)")
    p.add_argument("--prompt-len", type=int, default=2048, help="prompt tokens per request (default 2048)")
    p.add_argument("--max-tokens", type=int, default=8, help="new tokens per request (default 8)")
    p.add_argument("--requests", type=int, default=16, help="measured requests per mode and level (default 16)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests per mode and level first (default 2)")
    p.add_argument("--concurrency", default="1,4", help="requests in flight, one level each (default 1,4)")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if args.requests < 1 or args.warmup < 0 or args.prompt_len < 1 or min(args.concurrency) < 1:
        p.error("need --requests >= 1, --warmup >= 0, --prompt-len >= 1, --concurrency levels >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    run_bench(parse_args(argv), run, report)


if __name__ == "__main__":
    main()
