"""The first inter-token gap at one request in flight, P/D minus colocated, as a client sees it.

Starts a registry, a prefill, a decode and a colocated (``--role both``)
engine on one device (``bench.pd_identity.start_engines``: same model, dtype
and ``--kv-transport``), then sends ``--requests`` requests one at a time,
each with a fresh prompt of ``--prompt-len`` tokens and 2 greedy new tokens,
every prompt once as P/D and once colocated (alternating which goes first).
Client timestamps (``perf_counter``) of the outputs carrying tokens:

* P/D: the first token arrives in the prefill leg's output; the client then
  sends the decode leg with its ``kv_transfer`` at once (as the gateway does);
  the second token is the decode leg's first output.  The gap holds the
  client -> decode hop, the KV read and the first decode step;
* P/D with ``--kv-mode push`` (every engine started so): the decode leg first
  (``await_push``: its blocks pre-allocated, its first output a ``PushTarget``),
  then the prefill leg writing the KV into them as it computes; decode starts
  on the prefill's ``PushDone``, not on a client hop.  The gap is from the
  prefill's first token to the decode's first, as the gateway runs push mode;
* colocated: the gap between the first and the second token of one stream.

Prints p50 / mean of both gaps and P/D minus colocated (of the p50s), with (read
mode) the decode's own ``allocate_s``, ``kv_transfer_s`` and ``first_decode_step_s``
and the rest of the P/D gap, per request (the client -> decode hop, the
Generate's handling before the allocation, the output's way back).

    python -m bench.handoff_gap --device cpu --kv-transport shm [--kv-mode push]
    python -m bench.handoff_gap --device cuda --kv-transport nvlink --model /tmp/ckpt --prompt-len 2048 \\
        --engine-args "--max-model-len 4096 --max-num-batched-tokens 4096"
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.cli import bench_parser, run_bench
from bench.engine_driver import EngineDriver, prompt_ids
from bench.pd_identity import add_engine_args, add_kv_mode, start_engines
from bench.processes import Processes
from bench.push_vs_read import push_request
from bench.serving_stats import percentile
from common.messages import Generate, SamplingParams

SAMPLING = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)


async def pd_gap(driver: EngineDriver, rid: str, ids: list[int]) -> dict[str, float]:
    """One P/D request: the client's gap between its first two tokens and the decode's timings (seconds)."""
    t_first = params = None
    async for out in driver.client("prefill").stream(Generate(rid, SAMPLING, prompt_token_ids=ids,
                                                              do_remote_decode=True)):
        if out.token_ids and t_first is None:
            t_first = time.perf_counter()
        if out.kv_transfer is not None:
            params = out.kv_transfer
    if t_first is None or params is None:
        raise RuntimeError(f"prefill of {rid} finished without a token and kv_transfer")
    t_second, timings = None, {}
    async for out in driver.client("decode").stream(Generate(rid, SAMPLING, prompt_token_ids=ids,
                                                             remote_prefill=params)):
        if out.token_ids and t_second is None:
            t_second, timings = time.perf_counter(), out.timings or {}
    if t_second is None or "kv_failed" in timings:
        raise RuntimeError(f"{rid}: the decode leg read no KV (timings {timings}); the gap would measure a recompute")
    row = {"gap_s": t_second - t_first, "allocate_s": timings["allocate_s"],
           "kv_transfer_s": timings["kv_transfer_s"], "kv_read_s": timings["kv_read_s"],
           "first_decode_step_s": timings["first_decode_step_s"], "kv_bytes": timings["kv_bytes"]}
    row["rest_s"] = row["gap_s"] - row["allocate_s"] - row["kv_transfer_s"] - row["first_decode_step_s"]
    return row


async def pd_push_gap(driver: EngineDriver, rid: str, ids: list[int]) -> dict[str, float]:
    """One push-mode P/D request (engines with ``--kv-mode push``), as the gateway runs it
    (``bench.push_vs_read.push_request``): the client's gap between the prefill's first token and the decode's."""
    _, gap = await push_request(driver, rid, ids, SAMPLING, prefill="prefill", decode="decode")
    return {"gap_s": gap}


async def colocated_gap(driver: EngineDriver, rid: str, ids: list[int]) -> float:
    """One colocated request: the client's gap between its first two tokens (seconds)."""
    arrivals = []
    async for out in driver.client("both").stream(Generate(rid, SAMPLING, prompt_token_ids=ids)):
        arrivals += [time.perf_counter()] * len(out.token_ids)
    if len(arrivals) < 2:
        raise RuntimeError(f"colocated {rid} produced {len(arrivals)} tokens, not 2")
    return arrivals[1] - arrivals[0]


async def measure(driver: EngineDriver, args: argparse.Namespace) -> tuple[list[dict], list[float]]:
    """P/D rows and colocated gaps of the measured requests (after ``--warmup`` unmeasured ones of each)."""
    pd_rows, colocated = [], []
    pd = pd_push_gap if args.kv_mode == "push" else pd_gap
    for i in range(-args.warmup, args.requests):
        ids = prompt_ids(args.prompt_len, seed=10**6 + i)
        if i % 2:
            row = await pd(driver, f"pd-{i}", ids)
            gap = await colocated_gap(driver, f"co-{i}", ids)
        else:
            gap = await colocated_gap(driver, f"co-{i}", ids)
            row = await pd(driver, f"pd-{i}", ids)
        if i >= 0:
            pd_rows.append(row)
            colocated.append(gap)
    return pd_rows, colocated


def summary_ms(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1e3 for s in seconds]
    return {"p50_ms": percentile(ms, 50), "mean_ms": statistics.fmean(ms), "max_ms": max(ms)}


async def run(args: argparse.Namespace) -> dict:
    async with Processes() as procs:
        await start_engines(procs, args)
        driver = EngineDriver(procs.engine_endpoints(), timeout_s=120.0)
        try:
            pd_rows, colocated = await measure(driver, args)
        finally:
            await driver.close()
    result = {
        "setup": {"requests": args.requests, "warmup": args.warmup, "prompt_len": args.prompt_len,
                  "device": args.device, "model": args.model, "kv_transport": args.kv_transport,
                  "kv_mode": args.kv_mode},
        "pd_gap": summary_ms([r["gap_s"] for r in pd_rows]),
        "colocated_gap": summary_ms(colocated),
    }  # fmt: skip
    if args.kv_mode == "read":  # the decode's own timings of a read
        result["setup"]["kv_bytes"] = pd_rows[0]["kv_bytes"]
        for key in ("allocate", "kv_transfer", "kv_read", "first_decode_step", "rest"):
            result[key] = summary_ms([r[f"{key}_s"] for r in pd_rows])
    result["pd_minus_colocated_p50_ms"] = result["pd_gap"]["p50_ms"] - result["colocated_gap"]["p50_ms"]
    return result


def report(result: dict) -> str:
    setup = result["setup"]
    lines = [f"first inter-token gap, 1 request in flight: {setup['requests']} requests of {setup['prompt_len']} "
             f"tokens, {setup['device']}, model {setup['model']}, KV {setup['kv_mode']} over {setup['kv_transport']}",
             f"{'':34} {'p50 ms':>8} {'mean ms':>8} {'max ms':>8}"]
    for key, label in (("pd_gap", "P/D first gap"), ("allocate", "  decode: block allocation"),
                       ("kv_transfer", "  decode: KV transfer"), ("kv_read", "    of which the transport's read"),
                       ("first_decode_step", "  decode: first decode step"), ("rest", "  the rest: hops, Generate"),
                       ("colocated_gap", "colocated first gap")):
        if key not in result:
            continue
        s = result[key]
        lines.append(f"{label:34} {s['p50_ms']:8.2f} {s['mean_ms']:8.2f} {s['max_ms']:8.2f}")
    lines.append(f"P/D minus colocated (p50): {result['pd_minus_colocated_p50_ms']:+.2f} ms (goal <= 2 ms on one GPU)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    add_engine_args(p)
    add_kv_mode(p)
    p.add_argument("--requests", type=int, default=20, help="measured requests of each kind (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured requests of each kind first (default 3)")
    p.add_argument("--prompt-len", type=int, default=256, help="prompt tokens per request (default 256)")
    args = p.parse_args(argv)
    if args.requests < 1 or args.warmup < 0 or args.prompt_len < 1:
        p.error("need --requests >= 1, --warmup >= 0, --prompt-len >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    run_bench(parse_args(argv), run, report)


if __name__ == "__main__":
    main()
