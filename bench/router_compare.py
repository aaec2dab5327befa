"""pdserve's gateway against the Rust P/D routers (and a Python proxy), in the same run (issue 16).

Targets, each in front of instant fake engines (``--fake-engines K`` of each role, its own) doing
the whole prefill -> decode flow of every request:

* ``pdserve``: ``pdserve gateway`` (``--workers W``) over the bus to ``bench.fakes`` engines
  (``--bus-fakes engine``: the production engine service's parts with a fake model, KV handoff
  and release included) or to ``bench.fakes.instant`` ones (``--bus-fakes instant``: one canned
  answer per leg, as the HTTP fakes below answer; ``engine,instant``: both, as two targets);
* ``vllm-router`` (``--vllm-pd-disaggregation``) and ``sglang-router`` (``--pd-disaggregation``),
  from PyPI in a separate virtual environment (``--routers-venv``; they are not dependencies:
  ``python -m venv /tmp/routers && /tmp/routers/bin/pip install vllm-router sglang-router``),
  over HTTP to ``bench/fakes/http_engine.py`` in the style each expects; a router that is not
  installed is skipped, and the report says so;
* ``aiohttp``: a Python proxy in the style of vLLM's toy proxy (prefill with ``max_tokens=1`` and
  ``kv_transfer_params``, then decode's answer passed through, rotating over the fakes), over the
  vLLM-style fakes;
* ``direct (harness ceiling)``, in a sweep: the load straight at K HTTP decode fakes sharing one
  port, each answering a whole completion: the rate the harness itself reaches on the host.

Load: keep-alive HTTP/1.1 connections in ``--load-processes`` processes, each sending the next
request when the previous answer has fully arrived (closed loop); the completion asks for 2
tokens, so a stream is 2 events and ``[DONE]``.  Reported per target, non-streaming and
streaming: requests/s, p50, mean and p99 at ``--concurrency`` in flight (a list, e.g. ``64,512``:
every target at each, rows ``NAME at N`` for the later ones; a sweep takes the first), the router's CPU per request
(user + system time of its whole process tree, from ``/proc``: the gateway's worker processes
included, the fakes and the load generator not), p50 at 1 in flight; ratios against vllm-router; the CPU per
request and cores busy of each fake and of the load generator (``bench/process_cpu.py``), which
say whether the harness, not the router, saturated.
Targets alternate ``--rounds`` times; figures are pooled.  At 1 in flight pdserve's own histograms
split its mean latency (``split_at_one``): the HTTP side (the client's latency minus the gateway's
end-to-end), the two bus legs (each ``Generate`` sent to its reply, the engine's work included),
the gateway's own share (the rest of its end-to-end).

    python -m bench.router_compare --requests 8000
    python -m bench.router_compare --sweep 1,2,4,8 --fake-engines 4 --load-processes 4  # by gateway workers
    python -m bench.router_compare --baseline-tree ../main            # this gateway against main's, same run
    python -m bench.router_compare --no-peers --concurrency 64,512 --bus-fakes instant --baseline-tree ../main

``--no-peers``: pdserve's targets only (no routers, no aiohttp proxy).
``--sweep``: requests/s of pdserve with each number of workers against vllm-router at its
defaults (policy ``cache_aware``), streaming and not; scaling is the rate over the rate of 1 worker.
``--router-cpus``: in a sweep, the routers on those CPUs and the harness (load, fakes, registry) on the
others, as on a router host of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Awaitable, Callable

import httpx

from bench.cli import bench_parser, run_bench
from bench.gateway_overhead import load, spawn, wait_http
from bench.process_cpu import ProcessCPU, cpu_per_request
from bench.processes import free_port
from common.service import new_event_loop

PROMPT = "The quick brown fox jumps over the lazy dog"


def body(stream: bool) -> bytes:
    return json.dumps({"model": "fake", "prompt": PROMPT, "max_tokens": 2, "temperature": 0,
                       **({"stream": True} if stream else {})}).encode()


# --------------------------------------------------------------------------- #
# The aiohttp proxy (run in its own process with --serve-toy-proxy)
# --------------------------------------------------------------------------- #


def serve_toy_proxy(port: int, prefills: list[str], decodes: list[str]) -> None:
    """The proxy on ``port``, rotating over the ``prefills`` and the ``decodes`` (URLs) request by request."""
    from aiohttp import ClientSession, web

    prefill_urls, decode_urls = itertools.cycle(prefills), itertools.cycle(decodes)

    async def generate(request: web.Request) -> web.StreamResponse:
        req = await request.json()
        session: ClientSession = request.app["session"]
        first = {**req, "max_tokens": 1, "stream": False, "kv_transfer_params": {"do_remote_decode": True}}
        async with session.post(next(prefill_urls) + request.path, json=first) as r:
            params = (await r.json()).get("kv_transfer_params")
        async with session.post(next(decode_urls) + request.path, json={**req, "kv_transfer_params": params}) as r:
            if not req.get("stream"):
                return web.Response(body=await r.read(), content_type="application/json")
            answer = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await answer.prepare(request)
            async for chunk in r.content.iter_any():
                await answer.write(chunk)
            await answer.write_eof()
            return answer

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", generate)
        app.router.add_get("/health", lambda request: web.Response())
        async with ClientSession() as app["session"]:
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            await asyncio.Event().wait()

    loop = new_event_loop()
    loop.run_until_complete(main())


# --------------------------------------------------------------------------- #
# Targets
# --------------------------------------------------------------------------- #


@dataclass
class Target:
    """A port under load; ``router_pid`` the process tree whose CPU is the router's (None: no router, the
    harness alone), ``fakes`` the fake engines' pids by name (their CPU is reported too)."""

    name: str
    port: int
    router_pid: int | None
    fakes: dict[str, int] = field(default_factory=dict)


async def http_fakes(stack: ExitStack, style: str, engines: int) -> tuple[list[str], list[str], dict[str, int]]:
    """(prefill URLs, decode URLs, pids by name) of ``engines`` fake HTTP engines of each role in ``style``,
    answering."""
    urls: dict[str, list[str]] = {"prefill": [], "decode": []}
    pids, ports = {}, []
    for role in urls:
        for i in range(1, engines + 1):
            ports.append(free_port())
            pids[f"{role} {i}"] = spawn(stack, "-m", "bench.fakes.http_engine", "--port", str(ports[-1]), "--role",
                                        role, "--style", style).pid
            urls[role].append(f"http://127.0.0.1:{ports[-1]}")
    for port in ports:
        await wait_http(port, "/health")
    return urls["prefill"], urls["decode"], pids


def pinned(cpus: str | None, *argv: str) -> list[str]:
    """``argv`` run on the CPUs ``cpus`` (``taskset -c``; its children too), or as it is when None."""
    return ["taskset", "-c", cpus, *argv] if cpus else list(argv)


def repeated(flag: str, values: list[str], *after: str) -> list[str]:
    """``flag value *after`` for each value: a router's repeated ``--prefill``/``--decode``."""
    return [x for v in values for x in (flag, v, *after)]


async def start_direct(stack: ExitStack, engines: int) -> Target:
    """The harness's ceiling: the load straight at ``engines`` HTTP decode fakes sharing one port
    (``SO_REUSEPORT``), each answering a whole completion; no router in between."""
    port, pids = free_port(), {}
    for i in range(1, engines + 1):
        pids[f"direct {i}"] = spawn(stack, "-m", "bench.fakes.http_engine", "--port", str(port), "--role",
                                    "decode").pid
    await answered_on_new_connections(port, 4 * engines, "/health")
    return Target("direct (harness ceiling)", port, None, pids)


async def start_pdserve(stack: ExitStack, workers: int, fakes: str = "engine", tree: str | None = None,
                        engines: int = 1, cpus: str | None = None) -> Target:
    """pdserve's gateway (this checkout's, or the one in ``tree``: another checkout of pdserve) in front
    of a registry and ``engines`` fake engines of kind ``fakes`` per role, its own; the gateway (workers
    included) on the CPUs ``cpus`` when given."""
    registry, port = f"tcp://127.0.0.1:{free_port()}", free_port()
    spawn(stack, "-m", "services.registry", "--bind", registry, "--log-level", "warning")
    pids = {}
    for role in ("prefill", "decode"):
        for i in range(1, engines + 1):
            if fakes == "instant":
                fake = spawn(stack, "-m", "bench.fakes.instant", "--registry", registry, "--role", role)
            else:
                fake = spawn(stack, "-m", "bench.fakes", "--registry", registry, "--prefill",
                             str(int(role == "prefill")), "--decode", str(int(role == "decode")))
            pids[f"{role} {i}"] = fake.pid
    command = ("-m", "services.gateway", "--port", str(port), "--registry", registry, "--workers", str(workers),
               "--log-level", "warning")
    if tree is None:
        gateway = spawn(stack, *pinned(cpus, sys.executable, *command), python=False)
    else:  # -P: the modules of PYTHONPATH's tree, not of the working directory's
        gateway = spawn(stack, *pinned(cpus, "env", f"PYTHONPATH={os.path.abspath(tree)}", sys.executable, "-P",
                                       *command), python=False)
    await wait_http(port, "/ready")
    await answered_on_new_connections(port, 4 * workers, "/v1/instances",  # every worker sees every fake
                                      lambda r: r.status_code == 200 and len(r.json()["data"]) >= 2 * engines)
    name = f"pdserve x{workers}" if workers > 1 else "pdserve"
    if fakes != "engine":
        name += f" ({fakes} fakes)"
    return Target(name if tree is None else f"{name} @{os.path.basename(os.path.abspath(tree))}", port, gateway.pid,
                  pids)


async def answered_on_new_connections(port: int, times: int, path: str,
                                      ok: Callable[[httpx.Response], bool] = lambda r: r.status_code == 200,
                                      timeout_s: float = 30.0) -> None:
    """``GET path`` answered ``ok`` ``times`` in a row, each on a new connection (a worker or process of its
    own, often)."""
    deadline, streak = time.monotonic() + timeout_s, 0
    while streak < times:
        async with httpx.AsyncClient() as h:
            try:
                streak = streak + 1 if ok(await h.get(f"http://127.0.0.1:{port}{path}")) else 0
            except httpx.TransportError:
                streak = 0
        if time.monotonic() > deadline:
            raise TimeoutError(f"port {port}: not every worker ready within {timeout_s} s")
        if not streak:
            await asyncio.sleep(0.05)  # still starting: leave it the cores


async def start_vllm_router(stack: ExitStack, venv: str, defaults: bool = False, engines: int = 1,
                            cpus: str | None = None) -> Target:
    """vllm-router in front of its own HTTP fakes, on the CPUs ``cpus`` when given (its worker threads follow
    the CPUs it may run on)."""
    prefills, decodes, fakes = await http_fakes(stack, "vllm", engines)
    port = free_port()
    policy = [] if defaults else ["--prefill-policy", "round_robin", "--decode-policy", "round_robin"]
    router = spawn(stack, *pinned(cpus, os.path.join(venv, "bin", "vllm-router"), "--vllm-pd-disaggregation",
                                  *repeated("--prefill", prefills), *repeated("--decode", decodes), "--host",
                                  "127.0.0.1", "--port", str(port), "--log-level", "warning",
                                  "--worker-startup-check-interval", "1", "--prometheus-port", str(free_port()),
                                  *policy), python=False)
    await wait_http(port, "/v1/completions", "POST", timeout=120, content=body(False))
    return Target("vllm-router (defaults)" if defaults else "vllm-router", port, router.pid, fakes)


async def start_sglang_router(stack: ExitStack, venv: str, engines: int = 1) -> Target:
    prefills, decodes, fakes = await http_fakes(stack, "sglang", engines)
    port = free_port()
    router = spawn(stack, os.path.join(venv, "bin", "python"), "-m", "sglang_router.launch_router",
                   "--pd-disaggregation", *repeated("--prefill", prefills, "8998"), *repeated("--decode", decodes),
                   "--host", "127.0.0.1", "--port", str(port), "--policy", "round_robin", "--log-level", "warn",
                   "--worker-startup-check-interval", "1", "--prometheus-port", str(free_port()), python=False)
    await wait_http(port, "/v1/completions", "POST", timeout=120, content=body(False))
    return Target("sglang-router", port, router.pid, fakes)


async def start_toy_proxy(stack: ExitStack, engines: int = 1) -> Target:
    prefills, decodes, fakes = await http_fakes(stack, "vllm", engines)
    port = free_port()
    proxy = spawn(stack, "-m", "bench.router_compare", "--serve-toy-proxy", str(port),
                  *repeated("--prefill-url", prefills), *repeated("--decode-url", decodes))
    await wait_http(port, "/v1/completions", "POST", content=body(False))
    return Target("aiohttp", port, proxy.pid, fakes)


def installed(venv: str, package: str) -> str | None:
    """Why ``package`` cannot run from ``venv`` (None when it can)."""
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        return f"no virtual environment at {venv}"
    probe = subprocess.run([python, "-c", f"import {package}"], capture_output=True, text=True)
    return probe.stderr.strip().splitlines()[-1] if probe.returncode else None


# --------------------------------------------------------------------------- #
# Measuring
# --------------------------------------------------------------------------- #


def _load_process(port: int, payload: bytes, requests: int, concurrency: int) -> tuple[float, list[float], float]:
    loop = new_event_loop()
    cpu0 = time.process_time()
    try:
        elapsed, latencies = loop.run_until_complete(load(port, payload, requests, concurrency))
        return elapsed, latencies, time.process_time() - cpu0
    finally:
        loop.close()


class LoadGenerator:
    """``processes`` load-generating processes sharing the connections and requests of each run."""

    def __init__(self, processes: int):
        self.processes = processes
        self.pool = ProcessPoolExecutor(processes, mp_context=get_context("spawn"))

    async def run(self, port: int, payload: bytes, requests: int, concurrency: int
                  ) -> tuple[float, list[float], float]:
        """(elapsed seconds, latencies, the generator's CPU seconds, all its processes) of ``requests``
        requests at ``concurrency`` in flight."""
        n = min(self.processes, concurrency)
        loop = asyncio.get_running_loop()
        jobs = [loop.run_in_executor(self.pool, _load_process, port, payload, requests // n, concurrency // n)
                for _ in range(n)]
        results = await asyncio.gather(*jobs)
        return max(e for e, _, _ in results), [x for _, lat, _ in results for x in lat], sum(c for _, _, c in results)


async def measure(targets: list[Target], gen: LoadGenerator, stream: bool, requests: int, concurrency: int,
                  rounds: int, warm: Callable[[], Awaitable[None]] | None = None) -> dict[str, dict]:
    """Per target: rps, p50 and mean ms and the router's CPU us per request (None without a router),
    pooled over ``rounds`` alternations, and ``processes``: ``cpu_per_request`` of the load generator
    (``load xN``: N processes) and of each fake; ``warm()`` is awaited once every target is warmed up,
    before the measured rounds."""
    payload = body(stream)
    for t in targets:  # warm-up: connections, caches, first-call paths (every worker's, at 512 in flight too)
        await gen.run(t.port, payload, min(requests, max(500, 4 * concurrency)), concurrency)
    if warm is not None:
        await warm()
    load_name = f"load x{min(gen.processes, concurrency)}"
    pooled = {t.name: (0.0, [], Counter()) for t in targets}
    for _ in range(rounds):
        for t in targets:
            cpu = ProcessCPU({**({"router": t.router_pid} if t.router_pid else {}), **t.fakes})
            cpu.start()
            elapsed, lat, load_cpu = await gen.run(t.port, payload, requests // rounds, concurrency)
            total, latencies, spent = pooled[t.name]
            spent.update({load_name: load_cpu, **cpu.stop()})
            pooled[t.name] = (total + elapsed, latencies + lat, spent)
    out = {}
    for name, (elapsed, lat, spent) in pooled.items():
        processes = cpu_per_request(spent, len(lat), elapsed)
        router = processes.pop("router", None)
        lat.sort()
        out[name] = {"rps": len(lat) / elapsed, "p50_ms": statistics.median(lat) * 1e3,
                     "mean_ms": statistics.mean(lat) * 1e3, "p99_ms": lat[int(0.99 * (len(lat) - 1))] * 1e3,
                     "router_cpu_us": router and router["cpu_us"],
                     "processes": processes}
    return out


SPLIT_STAGES = ("e2e", "prefill_leg", "decode_first_output")


async def gateway_stage_seconds(port: int) -> dict[str, tuple[float, float]]:
    """(sum, count) of the gateway's latency histograms of ``SPLIT_STAGES``, from its ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient() as h:
        text = (await h.get(f"http://127.0.0.1:{port}/metrics")).text
    out = {}
    for family in text_string_to_metric_families(text):
        stage = family.name.removeprefix("pdserve_gateway_").removesuffix("_seconds")
        if stage in SPLIT_STAGES:
            values = {s.name.rsplit("_", 1)[1]: s.value for s in family.samples if s.name.endswith(("_sum", "_count"))}
            out[stage] = (values["sum"], values["count"])
    return out


def split_at_one(before: dict, after: dict, client_mean_ms: float) -> dict[str, float]:
    """pdserve's mean latency at 1 in flight, split (ms): HTTP side, bus legs, the gateway's own share."""
    mean = {k: (after[k][0] - before[k][0]) / (after[k][1] - before[k][1]) * 1e3 for k in SPLIT_STAGES}
    legs = mean["prefill_leg"] + mean["decode_first_output"]
    return {"client_mean_ms": client_mean_ms, "http_side_ms": client_mean_ms - mean["e2e"], "bus_legs_ms": legs,
            "gateway_own_ms": mean["e2e"] - legs}


async def compare(args: argparse.Namespace) -> dict:
    skipped: dict[str, str] = {}
    gen = LoadGenerator(args.load_processes)
    with ExitStack() as stack:
        k = args.fake_engines
        targets = [await start_pdserve(stack, args.workers, fakes, engines=k) for fakes in args.bus_fakes]
        if args.baseline_tree:
            targets += [await start_pdserve(stack, args.workers, fakes, args.baseline_tree, k)
                        for fakes in args.bus_fakes]
        ours = targets[:]
        for name, package, start in (("vllm-router", "vllm_router", start_vllm_router),
                                     ("sglang-router", "sglang_router", start_sglang_router)):
            if not args.peers:
                skipped[name] = "--no-peers"
            elif (why := installed(args.routers_venv, package)) is None:
                targets.append(await start(stack, args.routers_venv, engines=k))
            else:
                skipped[name] = why
        if args.peers:
            targets.append(await start_toy_proxy(stack, k))
        first, *more = args.concurrency
        result: dict = {"skipped": skipped, "concurrency": first}
        for stream in (False, True):
            key = "streaming" if stream else "non-streaming"
            loaded = await measure(targets, gen, stream, args.requests, first, args.rounds)
            for conc in more:  # the same targets again, as rows of their own
                rows = await measure(targets, gen, stream, args.requests, conc, args.rounds)
                loaded.update({f"{name} at {conc}": r for name, r in rows.items()})
            before: list[dict] = []

            async def snapshot() -> None:
                before.extend([await gateway_stage_seconds(t.port) for t in ours])

            unloaded = await measure(targets, gen, stream, args.requests // 8, 1, args.rounds, warm=snapshot)
            after = [await gateway_stage_seconds(t.port) for t in ours]
            for name in unloaded:
                loaded[name]["p50_1_ms"] = unloaded[name]["p50_ms"]
                loaded[name]["mean_1_ms"] = unloaded[name]["mean_ms"]
            for t, b, a in zip(ours, before, after):
                loaded[t.name]["split_at_1"] = split_at_one(b, a, unloaded[t.name]["mean_ms"])
            result[key] = loaded
    gen.pool.shutdown()
    return result


async def sweep(args: argparse.Namespace) -> dict:
    gen = LoadGenerator(args.load_processes)
    k = args.fake_engines
    why = "--no-peers" if not args.peers else installed(args.routers_venv, "vllm_router")
    skipped = {} if why is None else {"vllm-router": why}
    result: dict = {"skipped": skipped, "concurrency": args.concurrency[0], "load_processes": args.load_processes,
                    "non-streaming": {}, "streaming": {}}
    with ExitStack() as stack:  # every target up at once, so that the rounds alternate them (a host drifts)
        targets = [await start_direct(stack, k)]
        if not skipped:
            targets.append(await start_vllm_router(stack, args.routers_venv, defaults=True, engines=k,
                                                   cpus=args.router_cpus))
        targets += [await start_pdserve(stack, w, args.bus_fakes[0], engines=k, cpus=args.router_cpus)
                    for w in args.sweep]
        result["router_cpus"] = {t.name: sorted(os.sched_getaffinity(t.router_pid)) for t in targets if t.router_pid}
        for stream in (False, True):
            rates = await measure(targets, gen, stream, args.requests, args.concurrency[0], args.rounds)
            result["streaming" if stream else "non-streaming"].update(rates)
    gen.pool.shutdown()
    return result


# --------------------------------------------------------------------------- #
# Report
# --------------------------------------------------------------------------- #


def cpu_list(cpus: list[int]) -> str:
    """Sorted CPU numbers as ``taskset -c`` writes them: ``[0, 1, 2, 5]`` -> ``0-2,5``."""
    runs: list[list[int]] = []
    for c in cpus:
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def report(result: dict) -> str:
    lines = [f"{name}: skipped ({why})" for name, why in result.get("skipped", {}).items()]
    lines += [f"{name}: on CPUs {cpu_list(cpus)}" for name, cpus in result.get("router_cpus", {}).items()]
    for key in ("non-streaming", "streaming"):
        rows = result[key]
        base = rows.get("vllm-router") or rows.get("vllm-router (defaults)")
        lines += [f"\n{key}, {result['concurrency']} in flight (rows '... at N': N in flight):",
                  f"  {'':40} {'req/s':>8} {'p50 ms':>7} {'mean ms':>7} {'p99 ms':>7} "
                  f"{'CPU us/req':>10} {'p50 @1 ms':>9}   vs vllm-router: CPU, p50 @1"]
        for name, r in rows.items():
            router_cpu = r["router_cpu_us"]
            cpu_ratio = f"{router_cpu / base['router_cpu_us']:.2f}x" if base and router_cpu is not None else "-"
            at_one = r.get("p50_1_ms")
            added = f"{at_one - base['p50_1_ms']:+.2f} ms" if base and at_one is not None else "-"
            lines.append(f"  {name:40} {r['rps']:8.0f} {r['p50_ms']:7.2f} {r['mean_ms']:7.2f} "
                         f"{r.get('p99_ms', float('nan')):7.2f} "
                         f"{router_cpu if router_cpu is not None else float('nan'):10.0f} "
                         f"{at_one if at_one is not None else float('nan'):9.2f}   {cpu_ratio}, {added}")
        lines.append("  harness CPU us/req (cores busy; a fake saturates at 1, load xN at N):")
        lines += [f"    {name:30} " + ", ".join(f"{p} {c['cpu_us']:.0f} ({c['busy']:.2f})"
                                                for p, c in r["processes"].items()) for name, r in rows.items()]
        if (ceiling := rows.get("direct (harness ceiling)")) is not None:
            lines += [f"  {name}: {r['rps'] / ceiling['rps']:.2f}x the harness ceiling" for name, r in rows.items()
                      if r is not ceiling]
        ours = [name for name in rows if name.startswith("pdserve")]
        if ours and "p50_1_ms" not in rows[ours[0]]:  # a sweep: the first is 1 worker
            for name in ours:
                workers = int(m[1]) if (m := re.search(r" x(\d+)", name)) else 1
                versus = f", {rows[name]['rps'] / base['rps']:.2f}x vllm-router's rate" if base else ""
                lines.append(f"  {name}: scaling {rows[name]['rps'] / rows[ours[0]]['rps']:.2f} (ideal {workers})"
                             f"{versus}")
        for name in ours:
            if (split := rows[name].get("split_at_1")) is not None:
                versus = f" (vllm-router's client mean: {base['mean_1_ms']:.2f})" if base else ""
                lines.append(f"  {name} at 1 in flight, means: client {split['client_mean_ms']:.2f} ms = HTTP side "
                             f"{split['http_side_ms']:.2f} + bus legs (engines included) {split['bus_legs_ms']:.2f} + "
                             f"the gateway's own {split['gateway_own_ms']:.2f}{versus}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--requests", type=int, default=8000, help="measured requests per target and mode")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[64],
                        help="requests in flight; a list (64,512) measures every target at each, same run "
                        "(a sweep: the first)")
    parser.add_argument("--no-peers", dest="peers", action="store_false",
                        help="pdserve's targets only: no vllm-router, sglang-router nor aiohttp proxy")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the targets")
    parser.add_argument("--workers", type=int, default=1, help="pdserve gateway worker processes")
    parser.add_argument("--load-processes", type=int, default=1, help="load-generating processes")
    parser.add_argument("--bus-fakes", type=lambda s: s.split(","), default=["engine"],
                        help="pdserve's fake engines, one pdserve target each: engine (the engine service's parts), "
                        "instant (canned answers), or engine,instant")
    parser.add_argument("--routers-venv", default="/tmp/routers", help="virtual environment with vllm-router "
                        "and sglang-router")
    parser.add_argument("--baseline-tree", metavar="PATH", help="another checkout of pdserve whose gateway is "
                        "measured too, in the same run (e.g. main's, for a before/after figure)")
    parser.add_argument("--sweep", type=lambda s: [int(x) for x in s.split(",")],
                        help="pdserve worker counts to measure against vllm-router's defaults, e.g. 1,2,4,8")
    parser.add_argument("--router-cpus", metavar="LIST", help="a sweep's routers (pdserve's gateway and its workers, "
                        "vllm-router) on these CPUs only (taskset -c LIST, e.g. 0-15); the harness stays where "
                        "this runs (e.g. under taskset -c 16-31)")
    parser.add_argument("--fake-engines", type=int, default=1, metavar="K",
                        help="fake engines per role in front of each target (a sweep's direct target: K fakes)")
    parser.add_argument("--serve-toy-proxy", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--prefill-url", action="append", help=argparse.SUPPRESS)
    parser.add_argument("--decode-url", action="append", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.router_cpus and not args.sweep:
        parser.error("--router-cpus applies to a --sweep")
    if args.serve_toy_proxy:
        serve_toy_proxy(args.serve_toy_proxy, args.prefill_url, args.decode_url)
        return
    run_bench(args, sweep if args.sweep else compare, report)


if __name__ == "__main__":
    sys.exit(main())
