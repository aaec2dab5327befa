"""Gateway overhead: the full P/D read-mode path against a bare endpoint, in the same run.

* gateway: ``pdserve gateway`` (Starlette on uvicorn, uvloop + httptools) in front
  of instant fake engines (``bench/fakes/``: 1 prefill + 1 decode,
  real registry, real bus), so each request is HTTP parsing, validation, a
  prefill leg, a decode leg and the JSON response — the gateway's own cost;
* bare: a Starlette endpoint under the same uvicorn settings returning the same
  JSON bytes the gateway returned (same size);
* the same load generator for both: a minimal keep-alive HTTP/1.1 client on
  uvloop with ``--concurrency`` connections, each sending the next request as
  soon as the previous answer arrived (closed loop).  Targets alternate
  (bare, gateway, bare, gateway...) ``--rounds`` times; figures are pooled.

Each server is its own process (the two fake engines too); the load generator
runs here.  Reported: requests/s and p50/p99 latency for both at
``--concurrency``, the rate ratio and the p50 added latency; the same at
concurrency 1 (the unloaded per-request cost); the latency both add at the same
offered load, an open loop of Poisson arrivals at ``--open-load`` times the
gateway's closed-loop rate over the same ``--concurrency`` connections (in a
closed loop at full load latency is concurrency / rate, queueing rather than
the time the gateway adds to a request); the CPU time per request of each
serving process (``/proc``; in brackets the part spent in threads other than the
main one: libzmq's I/O thread) and of the load generator; and the ratio of the
two targets' CPU per request over all their processes.  On a machine with fewer
cores than busy processes the rate ratio tends to that CPU ratio, which other
load on the machine disturbs far less than it disturbs rates.
The bare endpoint is a reference floor, not a goal: ``bench/router_compare.py`` measures the
gateway against the P/D routers (issue 16).

    python -m bench.gateway_overhead --requests 16000 --concurrency 64
    python -m bench.gateway_overhead --requests 16000 --concurrency 64 --gateway bus-floor

``--gateway http-floor|bus-floor`` puts one of the floors of ``bench/gateway_floor.py``
in the gateway's place: what the HTTP exchange alone costs, and what the
cheapest gateway that still runs both legs over the bus costs.  ``--curve`` adds
a second gateway stack (its own registry and fakes) whose bus runs CURVE with
throwaway keys, measured in the same rounds: the CPU per request CURVE adds.

    python -m bench.gateway_overhead --requests 8000 --concurrency 64 --curve
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack

from bench.cli import bench_parser, run_bench
from bench.process_cpu import stat_cpu_s
from bench.processes import free_port
from common.bus.curve import KEYS_DIR_ENV, create_keys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- #
# The bare endpoint (run in its own process with --serve-bare)
# --------------------------------------------------------------------------- #


def serve_bare(port: int, body_path: str) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from services.gateway.server import UVICORN_LEAN

    with open(body_path, "rb") as f:
        payload = f.read()

    async def completions(request: Request) -> Response:
        await request.body()
        return Response(payload, media_type="application/json")

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", lifespan="off",
                log_level="warning", access_log=False, **UVICORN_LEAN)


# --------------------------------------------------------------------------- #
# Load generator
# --------------------------------------------------------------------------- #


class Connection:
    """One keep-alive HTTP/1.1 connection sending the same POST over and over."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, port: int):
        self.reader, self.writer, self.request, self.port = reader, writer, request, port

    @classmethod
    async def open(cls, port: int, path: str, body: bytes) -> "Connection":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        return cls(reader, writer, head + body, port)

    async def roundtrip(self) -> None:
        """Send the request, read the whole response (sized, or chunked: an event stream); raises unless
        its status is 200."""
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length, chunked = 0, False
        for line in head.split(b"\r\n"):
            name = line[:18].lower()
            if name.startswith(b"content-length:"):
                length = int(line[15:])
            elif name == b"transfer-encoding:":
                chunked = b"chunked" in line.lower()
        if chunked:
            while size := int((await self.reader.readuntil(b"\r\n"))[:-2], 16):
                await self.reader.readexactly(size + 2)
            await self.reader.readuntil(b"\r\n")
        else:
            await self.reader.readexactly(length)
        if status != 200:
            raise RuntimeError(f"HTTP {status} from port {self.port}")

    def close(self) -> None:
        self.writer.close()


async def load(port: int, body: bytes, requests: int, concurrency: int) -> tuple[float, list[float]]:
    """(elapsed seconds, latencies) of ``requests`` POSTs over ``concurrency`` connections."""
    conns = [await Connection.open(port, "/v1/completions", body) for _ in range(concurrency)]
    latencies: list[float] = []
    remaining = requests

    async def worker(conn: Connection) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            await conn.roundtrip()
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = time.perf_counter() - start
    for c in conns:
        c.close()
    return elapsed, latencies


async def load_at_rate(port: int, body: bytes, requests: int, concurrency: int,
                       rate: float) -> tuple[float, list[float]]:
    """Open loop: ``requests`` POSTs arriving as a Poisson process at ``rate``/s, each sent on a free
    one of ``concurrency`` connections (waiting for one when all are busy); latency counts from the
    arrival, so time spent waiting for a connection is in it.  The event loop's timers have a
    millisecond's resolution, which would release arrivals in bursts, so the last millisecond
    before each arrival is waited out yielding to the loop (the generator then keeps a core busy).
    Returns (elapsed seconds, latencies)."""
    free: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(concurrency):
        free.put_nowait(await Connection.open(port, "/v1/completions", body))
    latencies: list[float] = []

    async def one(arrival: float) -> None:
        conn = await free.get()
        try:
            await conn.roundtrip()
        finally:
            free.put_nowait(conn)
        latencies.append(time.perf_counter() - arrival)

    arrivals = random.Random(0)
    sent: list[asyncio.Task] = []
    start = arrival = time.perf_counter()
    for _ in range(requests):
        arrival += arrivals.expovariate(rate)
        if (delay := arrival - time.perf_counter()) > 0.001:
            await asyncio.sleep(delay - 0.001)
        while time.perf_counter() < arrival:
            await asyncio.sleep(0)
        sent.append(asyncio.create_task(one(arrival)))
    await asyncio.gather(*sent)
    elapsed = time.perf_counter() - start
    while not free.empty():
        free.get_nowait().close()
    return elapsed, latencies


def summarize(elapsed: float, latencies: list[float]) -> dict:
    lat = sorted(latencies)
    return {"requests": len(lat), "rps": len(lat) / elapsed, "p50_ms": statistics.median(lat) * 1e3,
            "p99_ms": lat[int(0.99 * (len(lat) - 1))] * 1e3}


async def compare(targets: dict[str, tuple[int, dict[int, str]]], body: bytes, requests: int, concurrency: int,
                  rounds: int, rate: float | None = None) -> dict:
    """``targets``: name -> (port, {pid: process name} of the processes serving it, charged its CPU time).
    Closed loop at ``concurrency``, or an open loop at ``rate`` when given."""
    def run_load(port: int, n: int):
        return load(port, body, n, concurrency) if rate is None else load_at_rate(port, body, n, concurrency, rate)

    for port, _ in targets.values():  # warm-up: connections, allocator, first-call paths
        await run_load(port, min(requests, 500))
    pooled = {name: (0.0, [], {pid: (0.0, 0.0) for pid in pids}, 0.0) for name, (_, pids) in targets.items()}
    for _ in range(rounds):
        for name, (port, pids) in targets.items():
            cpu0 = {pid: cpu_seconds(pid) for pid in pids}
            load0 = time.process_time()
            elapsed, lat = await run_load(port, requests // rounds)
            load_cpu = time.process_time() - load0
            total, all_lat, cpu, loadgen = pooled[name]
            for pid in pids:
                (main, other), (main0, other0) = cpu_seconds(pid), cpu0[pid]
                cpu[pid] = (cpu[pid][0] + main - main0, cpu[pid][1] + other - other0)
            pooled[name] = (total + elapsed, all_lat + lat, cpu, loadgen + load_cpu)
    out = {}
    for name, (elapsed, lat, cpu, loadgen) in pooled.items():
        out[name] = summarize(elapsed, lat)
        per = 1e6 / len(lat)
        out[name]["cpu_us_per_request"] = {targets[name][1][pid]: sum(cpu[pid]) * per for pid in cpu}
        out[name]["io_thread_us_per_request"] = {targets[name][1][pid]: cpu[pid][1] * per for pid in cpu}
        out[name]["loadgen_cpu_us_per_request"] = loadgen * per
    return out


# --------------------------------------------------------------------------- #
# Orchestration
# --------------------------------------------------------------------------- #


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User + system CPU time of a process so far (Linux /proc): (main thread, all other threads).

    The other threads are libzmq's I/O thread (every ZMQ message is handed to it) and
    the like: the part of a process's cost that no Python code shows.
    """
    total = stat_cpu_s(f"/proc/{pid}/stat")
    main = stat_cpu_s(f"/proc/{pid}/task/{pid}/stat")
    return main, total - main


def spawn(stack: ExitStack, *args: str, keys: str | None = None, python: bool = True) -> subprocess.Popen:
    """``python *args`` (``args`` alone when not ``python``) until ``stack`` closes, with the bus keys
    directory ``keys`` when given."""
    env = {**os.environ, KEYS_DIR_ENV: keys} if keys else {k: v for k, v in os.environ.items() if k != KEYS_DIR_ENV}
    proc = subprocess.Popen([sys.executable, *args] if python else list(args), cwd=ROOT, stdout=subprocess.DEVNULL,
                            env=env)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    stack.callback(stop)
    return proc


async def wait_http(port: int, path: str, method: str = "GET", timeout: float = 30.0, content: bytes | None = None,
                    ) -> None:
    """Wait until ``method path`` (with body ``content``) answers 200."""
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as h:
        while True:
            try:
                if (await h.request(method, f"http://127.0.0.1:{port}{path}", content=content,
                                    headers={"Content-Type": "application/json"})).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"http://127.0.0.1:{port}{path} not ready within {timeout} s")
            await asyncio.sleep(0.1)


def start_gateway(stack: ExitStack, args: argparse.Namespace, keys: dict[str, str] | None = None
                  ) -> tuple[int, dict[int, str]]:
    """A registry, the two fakes and the gateway (CURVE with ``keys``: role -> keys directory); returns the
    gateway's port and the pids serving it, named."""
    registry = f"tcp://127.0.0.1:{free_port()}"
    gw_port = free_port()
    keys = keys or {}
    spawn(stack, "-m", "services.registry", "--bind", registry, "--log-level", "warning", keys=keys.get("registry"))
    fakes = [spawn(stack, "-m", "bench.fakes", "--registry", registry, "--prefill", str(p), "--decode", str(1 - p),
                   "--tokens-per-output", str(args.tokens_per_output), keys=keys.get("engine")) for p in (1, 0)]
    variant = () if args.gateway == "full" else ("-m", "bench.gateway_floor", "--variant", args.gateway)
    gateway = spawn(stack, *(variant or ("-m", "services.gateway")), "--port", str(gw_port), "--registry",
                    registry, "--log-level", "warning", keys=keys.get("gateway"))
    return gw_port, {gateway.pid: "gateway", fakes[0].pid: "fake_prefill", fakes[1].pid: "fake_decode"}


async def run(args: argparse.Namespace) -> dict:
    import httpx

    bare_port = free_port()
    body = json.dumps({"model": "fake", "prompt": "The quick brown fox jumps over the lazy dog",
                       "max_tokens": args.max_tokens, "temperature": 0}).encode()
    with ExitStack() as stack:
        gw_port, gw_pids = start_gateway(stack, args)
        targets = {"gateway": (gw_port, gw_pids)}
        if args.curve:
            keys = create_keys(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-keys-")))
            targets["gateway+curve"] = start_gateway(stack, args, {role: str(d) for role, d in keys.items()})
        for port, _ in targets.values():
            await wait_http(port, "/ready")
        async with httpx.AsyncClient() as h:
            sample = (await h.post(f"http://127.0.0.1:{gw_port}/v1/completions", content=body,
                                   headers={"Content-Type": "application/json"})).content
        body_file = stack.enter_context(tempfile.NamedTemporaryFile(suffix=".json"))
        body_file.write(sample)
        body_file.flush()
        bare = spawn(stack, "-m", "bench.gateway_overhead", "--serve-bare", str(bare_port), "--body-file",
                     body_file.name)
        await wait_http(bare_port, "/v1/completions", "POST")
        targets = {"bare": (bare_port, {bare.pid: "bare"}), **targets}
        loaded = await compare(targets, body, args.requests, args.concurrency, args.rounds)
        unloaded = await compare(targets, body, args.requests // 4, 1, args.rounds)
        open_rate = args.open_load * loaded["gateway"]["rps"]
        same_load = await compare(targets, body, args.requests // 2, args.concurrency, args.rounds, open_rate)
    result = {"response_bytes": len(sample), "concurrency": args.concurrency, "max_tokens": args.max_tokens,
              "tokens_per_output": args.tokens_per_output, "loaded": loaded, "unloaded": unloaded,
              "same_load": same_load, "open_rate": open_rate}
    for key in ("loaded", "unloaded", "same_load"):
        r = result[key]
        r["rate_ratio"] = r["gateway"]["rps"] / r["bare"]["rps"]
        r["p50_added_ms"] = r["gateway"]["p50_ms"] - r["bare"]["p50_ms"]
        r["cpu_ratio"] = cpu_per_request(r["bare"]) / cpu_per_request(r["gateway"])
        if args.curve:
            r["curve_cpu_ratio"] = cpu_per_request(r["gateway+curve"]) / cpu_per_request(r["gateway"])
            r["curve_rate_ratio"] = r["gateway+curve"]["rps"] / r["gateway"]["rps"]
    return result


def cpu_per_request(summary: dict) -> float:
    """CPU microseconds one request costs all processes of a target, the load generator's share included."""
    return sum(summary["cpu_us_per_request"].values()) + summary["loadgen_cpu_us_per_request"]


def report(result: dict) -> str:
    lines = [f"response body: {result['response_bytes']} bytes (same for both); {result['max_tokens']} tokens, "
             f"decode sends {result['tokens_per_output']} per message"]
    titles = {"loaded": f"closed loop, {result['concurrency']} in flight",
              "unloaded": "closed loop, 1 in flight",
              "same_load": f"open loop, {result['open_rate']:.0f} req/s offered to both, "
                           f"over {result['concurrency']} connections"}
    for key, title in titles.items():
        r = result[key]
        lines += [f"\n{title}:", f"  {'':13} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8}   "
                  "CPU us/request by process (of which I/O threads)"]
        for name in [n for n in ("bare", "gateway", "gateway+curve") if n in r]:
            s = r[name]
            cpu = ", ".join(f"{k} {v:.0f} ({s['io_thread_us_per_request'][k]:.0f})"
                            for k, v in s["cpu_us_per_request"].items())
            lines.append(f"  {name:13} {s['rps']:10.0f} {s['p50_ms']:8.2f} {s['p99_ms']:8.2f}   {cpu}, "
                         f"load generator {s['loadgen_cpu_us_per_request']:.0f}")
        lines.append(f"  gateway/bare rate: {r['rate_ratio']:.2f}   p50 added: {r['p50_added_ms']:.2f} ms   "
                     f"CPU/request bare/gateway (all processes): {r['cpu_ratio']:.2f}")
        if "curve_cpu_ratio" in r:
            gateway_cpu = [r[name]["cpu_us_per_request"]["gateway"] for name in ("gateway+curve", "gateway")]
            lines.append(f"  with CURVE / without: rate {r['curve_rate_ratio']:.2f}   CPU/request (all processes) "
                         f"{r['curve_cpu_ratio']:.2f}   gateway process CPU/request "
                         f"{gateway_cpu[0] / gateway_cpu[1]:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--requests", type=int, default=4000, help="measured requests per target at --concurrency")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of bare and gateway")
    parser.add_argument("--open-load", type=float, default=0.5,
                        help="open-loop rate for the same-load latency, as a fraction of the gateway's closed-loop rate")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per response (prefill 1 + decode rest)")
    parser.add_argument("--tokens-per-output", type=int, default=16,
                        help="decode tokens per TokenOutput message (16: the whole decode leg in one message)")
    parser.add_argument("--gateway", choices=("full", "http-floor", "bus-floor"), default="full",
                        help="the gateway, or one of the floors of bench/gateway_floor.py in its place")
    parser.add_argument("--curve", action="store_true", help="also a gateway stack with CURVE on its bus, same rounds")
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--body-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_bare:
        serve_bare(args.serve_bare, args.body_file)
        return
    run_bench(args, run, report)


if __name__ == "__main__":
    main()
