"""P/D handoff overhead through real service processes, against a bus round trip in the same run.

Starts a registry, a prefill and a decode process (``python -m services.*``,
demo model, CPU, Mooncake over TCP on loopback; see ``bench/processes.py``), then
sends ``--requests`` P/D requests one at a time, each with a fresh random
prompt of ``--prompt-len`` tokens (no prefix-cache hits on either side) and
``max_tokens=2`` (the first token comes from prefill, the second is decode's
first decode step).  Per request, with client timestamps (``perf_counter``):

* ``t_reply``: the prefill ``TokenOutput`` carrying ``kv_transfer`` arrives;
* the decode ``Generate(remote_prefill=...)`` is sent at once;
* ``t_first``: decode's first ``TokenOutput`` arrives.

Decode reports, in that output's ``timings``: ``kv_transfer_s`` (the
connector's ``read_blocks``: handshake lookup, range merge, thread-pool backend
read, status checks) and ``first_decode_step_s`` (from the read's end to the
first decode step's output reaching the decode handler: handing the request
back to the engine thread, which then runs the step at once, and the step).

    overhead = (t_first - t_reply) - kv_transfer_s - first_decode_step_s

i.e. what lies between the client holding prefill's reply and decode's first
decode step that is neither the transfer nor the step: the client -> decode
hop, request validation, block allocation (a command round trip to the engine
thread), connector bookkeeping around the read, plus the one decode -> client
hop that carries the first token back (the client cannot see the step without
it).  The command that hands the KV-ready request back to the engine thread
is counted in ``first_decode_step_s``, not in the overhead: on two cores the
step starts on the engine thread while the event loop still waits for the GIL
to see that command's reply, so the two cannot be told apart from the service;
the allocation round trip (same mechanism, no contention) is in the overhead.
Baseline in the same run: a ``GetStats`` round trip to the decode process (one
bus hop each way).

    python bench/handoff_overhead.py --requests 200 --prompt-len 64
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.cli import bench_parser, run_bench
from bench.engine_driver import EngineDriver, prompt_ids
from bench.processes import Processes
from bench.serving_stats import percentile
from common.messages import EngineStats, Generate, GetStats, SamplingParams

SAMPLING = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)


async def one_handoff(clients: EngineDriver, rid: str, ids: list[int]) -> dict[str, float]:
    """Run one P/D request; returns its client-side and decode-side durations in seconds."""
    t_reply = None
    params = None
    async for out in clients.client("prefill").stream(Generate(rid, SAMPLING, prompt_token_ids=ids,
                                                               do_remote_decode=True)):
        if out.kv_transfer is not None:
            t_reply, params = time.perf_counter(), out.kv_transfer
    if params is None:
        raise RuntimeError(f"prefill of {rid} finished without kv_transfer")
    t_first = None
    timings: dict[str, float] = {}
    async for out in clients.client("decode").stream(Generate(rid, SAMPLING, prompt_token_ids=ids,
                                                              remote_prefill=params)):
        if t_first is None:
            t_first, timings = time.perf_counter(), out.timings or {}
    if "kv_failed" in timings:
        raise RuntimeError(f"{rid}: the KV read failed; the figures would measure a recompute")
    handoff = t_first - t_reply
    return {
        "handoff_s": handoff,
        "kv_transfer_s": timings["kv_transfer_s"],
        "first_decode_step_s": timings["first_decode_step_s"],
        "overhead_s": handoff - timings["kv_transfer_s"] - timings["first_decode_step_s"],
        "kv_bytes": timings["kv_bytes"],
    }


async def bus_round_trip(clients: EngineDriver) -> float:
    started = time.perf_counter()
    assert isinstance(await clients.client("decode").call(GetStats()), EngineStats)
    return time.perf_counter() - started


def summary(values: list[float]) -> dict[str, float]:
    ms = [v * 1e3 for v in values]
    return {"p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "mean_ms": statistics.fmean(ms)}


async def run(args: argparse.Namespace) -> dict:
    async with Processes() as procs:
        procs.start_registry()
        flags = ("--kv-renew-interval-s", "1", "--max-num-seqs", "8")
        procs.start_engine("prefill", "prefill", *flags)
        procs.start_engine("decode", "decode", *flags)
        await procs.wait_registered("prefill", "decode")
        clients = EngineDriver(procs.engine_endpoints(), timeout_s=30.0)
        try:
            for i in range(args.warmup):  # handshake, first-call paths, allocator warm-up
                await one_handoff(clients, f"warm-{i}", prompt_ids(args.prompt_len, seed=10**6 + i))
            rows = [await one_handoff(clients, f"req-{i}", prompt_ids(args.prompt_len, seed=i))
                    for i in range(args.requests)]
            rtts = [await bus_round_trip(clients) for _ in range(args.requests)]
            await clients.wait_idle("prefill", "decode")
        finally:
            await clients.close()
    result = {
        "setup": {"requests": args.requests, "warmup": args.warmup, "prompt_len": args.prompt_len,
                  "kv_bytes": rows[0]["kv_bytes"], "mode": "real processes, demo model, CPU, Mooncake TCP loopback"},
        **{key: summary([r[key] for r in rows])
           for key in ("overhead_s", "handoff_s", "kv_transfer_s", "first_decode_step_s")},
        "bus_round_trip_s": summary(rtts),
    }  # fmt: skip
    result["overhead_over_round_trip_p50"] = result["overhead_s"]["p50_ms"] / result["bus_round_trip_s"]["p50_ms"]
    return result


def report(result: dict) -> str:
    setup = result["setup"]
    lines = [f"P/D handoff, {setup['mode']}; {setup['requests']} sequential requests, {setup['prompt_len']}-token "
             f"prompts ({setup['kv_bytes'] / 1024:.0f} KiB of KV each)",
             f"{'':32} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}"]
    for key, label in (("overhead_s", "handoff overhead"), ("handoff_s", "prefill reply -> first decode token"),
                       ("kv_transfer_s", "  of which KV transfer"), ("first_decode_step_s", "  of which first step"),
                       ("bus_round_trip_s", "baseline: bus round trip")):
        s = result[key]
        lines.append(f"{label:32} {s['p50_ms']:8.3f} {s['p99_ms']:8.3f} {s['mean_ms']:8.3f}")
    lines.append(f"handoff overhead p50 = {result['overhead_over_round_trip_p50']:.2f} x bus round trip p50")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    p.add_argument("--requests", type=int, default=200, help="measured requests, sequential (default 200)")
    p.add_argument("--warmup", type=int, default=10, help="unmeasured requests first (default 10)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per request (default 64)")
    args = p.parse_args(argv)
    if args.requests < 1 or args.warmup < 0 or args.prompt_len < 1:
        p.error("need --requests >= 1, --warmup >= 0, --prompt-len >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    run_bench(parse_args(argv), run, report)


if __name__ == "__main__":
    main()
