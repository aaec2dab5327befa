"""A bounded soak: N streaming clients for T seconds against a real P/D stack (demo model, CPU).

The stack is what ``pdserve up`` runs, one process each (``bench.processes``): a
registry, a prefill and a decode engine, a gateway.  Each client sends one
streaming completion after another until the time is up; every request is
timed like ``pdserve bench`` times it (``bench.serving.send_request``).  Before the
soak, one client runs alone for ``--baseline-s``: the soak's p99 TTFT and TPOT are
reported as ratios to that baseline's, measured in the same run.

Reported: requests, failures by kind (``http_<status>:<code>``,
``stream_error:<code>``, the client-side kinds of ``bench.serving``), p50/p99
TTFT and TPOT, and each process's RSS and open file descriptors before the
soak and after it (once the gateway's in-flight gauge is back to 0).

    python -m bench.soak                            # 64 clients x 30 s
    python -m bench.soak --clients 200 --seconds 60 # issue 15's soak
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import shlex
import time
from collections import Counter
from pathlib import Path

import httpx

from bench.cli import bench_parser, run_bench
from bench.processes import Processes, free_port
from bench.serving import BenchConfig, send_request
from bench.serving_stats import RequestRecord, percentile

CODE = re.compile(r'"code"\s*:\s*"([^"]+)"')
IN_FLIGHT = re.compile(r"^pdserve_gateway_requests_in_flight (\S+)$", re.M)
WORDS = "the quick brown fox jumps over a lazy dog while prefill hands decode its cache".split()
READY_TIMEOUT_S = 180.0
SETTLE_TIMEOUT_S = 60.0


def failure_kind(record: RequestRecord) -> str:
    """``record.error``, with the OpenAI error code of an HTTP or in-stream error when it has one."""
    match = CODE.search(record.error_detail) if record.error and record.error.startswith(("http_", "stream_")) else None
    return f"{record.error}:{match.group(1)}" if match else str(record.error)


def usage_of(pid: int) -> dict[str, int]:
    """A process's resident memory (KiB) and open file descriptors, from ``/proc``."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1))
    return {"rss_kib": rss, "fds": len(list(Path(f"/proc/{pid}/fd").iterdir()))}


def prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def client_loop(http: httpx.AsyncClient, config: BenchConfig, args: argparse.Namespace, seed: int,
                      until: float, records: list[RequestRecord], t0: float) -> None:
    """Streaming completions one after another until ``until`` (the loop's clock)."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        record = RequestRecord(len(records), 0.0, args.prompt_words)
        records.append(record)
        body = {"model": "demo", "prompt": prompt(rng, args.prompt_words), "max_tokens": args.output_len,
                "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True, "temperature": 0.0}
        await send_request(http, config, config.base_url + "/v1/completions", body, record, t0)


async def phase(http: httpx.AsyncClient, config: BenchConfig, args: argparse.Namespace, clients: int,
                seconds: float) -> tuple[list[RequestRecord], float]:
    """``clients`` client loops for ``seconds``; the records and the phase's duration."""
    records: list[RequestRecord] = []
    t0 = time.perf_counter()
    until = asyncio.get_running_loop().time() + seconds
    await asyncio.gather(*(client_loop(http, config, args, i, until, records, t0) for i in range(clients)))
    return records, time.perf_counter() - t0


def latency(records: list[RequestRecord]) -> dict[str, float | None]:
    """p50/p99 TTFT and TPOT (ms) of the successful requests."""
    ok = [r for r in records if r.ok]
    out: dict[str, float | None] = {}
    for name, values in (("ttft", [r.ttft_s for r in ok if r.ttft_s is not None]),
                         ("tpot", [r.tpot_s for r in ok if r.tpot_s is not None])):
        for q in (50, 99):
            out[f"{name}_p{q}_ms"] = percentile(values, q) * 1e3 if values else None
    return out


async def in_flight(http: httpx.AsyncClient) -> float:
    match = IN_FLIGHT.search((await http.get("/metrics")).text)
    return float(match.group(1)) if match else -1.0


async def wait_for(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not within {timeout_s:g} s")
        await asyncio.sleep(0.2)


async def soak(args: argparse.Namespace) -> dict:
    async with Processes() as procs:
        procs.start_registry()
        engine_args = shlex.split(args.engine_args)
        procs.start_engine("prefill", "prefill", *engine_args, num_kv_blocks=args.num_kv_blocks)
        procs.start_engine("decode", "decode", *engine_args, num_kv_blocks=args.num_kv_blocks)
        port = free_port()
        procs.spawn("gateway", "services.gateway", ["--port", str(port), "--registry", procs.registry_endpoint,
                                                    "--log-level", "warning", *shlex.split(args.gateway_args)])
        await procs.wait_registered("prefill", "decode", timeout_s=READY_TIMEOUT_S)
        config = BenchConfig(url=f"http://127.0.0.1:{port}", timeout_s=args.timeout_s,
                             request_timeout_s=args.request_timeout_s, progress=False)
        limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
        async with httpx.AsyncClient(base_url=config.base_url, limits=limits,
                                     timeout=httpx.Timeout(args.timeout_s)) as http:
            async def ready() -> bool:
                try:
                    return (await http.get("/ready")).status_code == 200
                except httpx.HTTPError:
                    return False

            await wait_for(ready, READY_TIMEOUT_S, "gateway ready")
            names = ("gateway", "prefill", "decode")
            baseline, _ = await phase(http, config, args, 1, args.baseline_s)  # also warms every process up
            before = {n: usage_of(procs.procs[n].popen.pid) for n in names}
            records, duration = await phase(http, config, args, args.clients, args.seconds)
            await wait_for(lambda: _zero(in_flight(http)), SETTLE_TIMEOUT_S, "in-flight gauge back to 0")
            after = {n: usage_of(procs.procs[n].popen.pid) for n in names}
            procs.check_alive()
    base, load = latency(baseline), latency(records)
    ratio = {k: (load[k] / base[k] if load[k] and base[k] else None) for k in ("ttft_p99_ms", "tpot_p99_ms")}
    return {"clients": args.clients, "seconds": args.seconds, "duration_s": duration, "requests": len(records),
            "ok": sum(r.ok for r in records),
            "failures": dict(Counter(failure_kind(r) for r in records if not r.ok).most_common()),
            "baseline": {"requests": len(baseline), "failed": sum(not r.ok for r in baseline), **base},
            "soak": load, "p99_vs_baseline": ratio, "before": before, "after": after,
            "first_failure": next((r.error_detail for r in records if not r.ok), None)}


async def _zero(value) -> bool:
    return await value == 0


def report(result: dict) -> str:
    lines = [f"soak: {result['clients']} clients x {result['seconds']:g} s ({result['duration_s']:.1f} s): "
             f"{result['requests']} requests, {result['ok']} ok, {result['requests'] - result['ok']} failed"]
    lines += [f"  {kind}: {count}" for kind, count in result["failures"].items()]
    if result["first_failure"]:
        lines.append(f"  first failure: {result['first_failure'][:200]}")
    b, s, r = result["baseline"], result["soak"], result["p99_vs_baseline"]

    def ms(v):
        return "-" if v is None else f"{v:.1f}"

    def x(v):
        return "-" if v is None else f"{v:.1f}x"

    lines.append(f"  baseline (1 client, {b['requests']} requests, {b['failed']} failed): TTFT p50/p99 "
                 f"{ms(b['ttft_p50_ms'])}/{ms(b['ttft_p99_ms'])} ms, TPOT p50/p99 {ms(b['tpot_p50_ms'])}/"
                 f"{ms(b['tpot_p99_ms'])} ms")
    lines.append(f"  soak: TTFT p50/p99 {ms(s['ttft_p50_ms'])}/{ms(s['ttft_p99_ms'])} ms ({x(r['ttft_p99_ms'])} "
                 f"baseline p99), TPOT p50/p99 {ms(s['tpot_p50_ms'])}/{ms(s['tpot_p99_ms'])} ms "
                 f"({x(r['tpot_p99_ms'])})")
    for name, before in result["before"].items():
        after = result["after"][name]
        lines.append(f"  {name}: RSS {before['rss_kib'] / 1024:.0f} -> {after['rss_kib'] / 1024:.0f} MiB, "
                     f"fds {before['fds']} -> {after['fds']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--clients", type=int, default=64, help="concurrent streaming clients")
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the clients keep sending")
    parser.add_argument("--baseline-s", type=float, default=5.0, help="one client alone first, for the baseline")
    parser.add_argument("--prompt-words", type=int, default=24, help="words per prompt (random, seeded)")
    parser.add_argument("--output-len", type=int, default=32, help="max_tokens (ignore_eos)")
    parser.add_argument("--num-kv-blocks", type=int, default=512, help="KV blocks of each engine")
    parser.add_argument("--engine-args", default="", help="extra flags for both engines")
    parser.add_argument("--gateway-args", default="", help="extra flags for the gateway")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="client: longest wait for the next chunk")
    parser.add_argument("--request-timeout-s", type=float, default=600.0, help="client: longest request")
    run_bench(parser.parse_args(argv), soak, report)


if __name__ == "__main__":
    main()
