"""Failover time of discovery: from an engine's SIGKILL to the gateway no longer routing to it.

For each backend -- the ZMQ registry (``pdserve registry``) and a one-member etcd
(``--registry etcd://``) -- with the same lease TTL and heartbeat interval (a third
of it): a gateway process, a fake prefill and a fake decode engine (``bench.fakes``,
real registration and heartbeats) that stay, and one fake decode engine per trial
that is SIGKILLed once the gateway lists it.  Measured: the time from the SIGKILL
until the gateway's ``/v1/instances`` (what its router picks from) no longer lists
it, polled every 5 ms.  Reported: median, min and max per backend and the ratio
etcd / ZMQ of the medians.

    python -m bench.discovery_failover --lease-ttl-s 2 --trials 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from contextlib import AsyncExitStack, ExitStack

import httpx

from bench.etcd_cluster import EtcdCluster
from bench.gateway_overhead import spawn, wait_http
from bench.processes import free_port

POLL_S = 0.005


async def listed(http: httpx.AsyncClient) -> set[str]:
    return {i["id"] for i in (await http.get("/v1/instances")).json()["data"]}


async def wait_for(http: httpx.AsyncClient, predicate, timeout: float = 30.0) -> set[str]:
    deadline = time.monotonic() + timeout
    while not predicate(ids := await listed(http)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gateway still lists {sorted(ids)} after {timeout:g} s")
        await asyncio.sleep(POLL_S)
    return ids


async def failover_times(url: str, trials: int, heartbeat_s: float) -> list[float]:
    """Seconds from SIGKILL to the gateway dropping the engine, ``trials`` times, with discovery ``url``."""
    port = free_port()
    with ExitStack() as stack:
        spawn(stack, "-m", "services.gateway", "--port", str(port), "--registry", url, "--log-level", "warning")
        spawn(stack, "-m", "bench.fakes", "--registry", url)
        await wait_http(port, "/ready")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5.0) as http:
            stay = await wait_for(http, lambda ids: len(ids) == 2)
            times = []
            for _ in range(trials):
                with ExitStack() as victim_stack:
                    victim = spawn(victim_stack, "-m", "bench.fakes", "--registry", url, "--prefill", "0")
                    [victim_id] = await wait_for(http, lambda ids: len(ids) == 3) - stay
                    # a heartbeat or more, then a random point between two heartbeats
                    await asyncio.sleep(1.0 + random.uniform(0, heartbeat_s))
                    victim.kill()
                    killed = time.monotonic()
                    await wait_for(http, lambda ids: victim_id not in ids)
                    times.append(time.monotonic() - killed)
        return times


def summary(times: list[float]) -> dict:
    return {"median_s": round(statistics.median(times), 3), "min_s": round(min(times), 3),
            "max_s": round(max(times), 3), "trials": [round(t, 3) for t in times]}


async def run(args: argparse.Namespace) -> dict:
    ttl = args.lease_ttl_s
    registry_port = free_port()
    results = {}
    with ExitStack() as stack:
        spawn(stack, "-m", "services.registry", "--bind", f"tcp://127.0.0.1:{registry_port}",
              "--heartbeat-interval-s", str(ttl / 3), "--lease-ttl-s", str(ttl), "--log-level", "warning")
        results["zmq"] = summary(await failover_times(f"tcp://127.0.0.1:{registry_port}", args.trials, ttl / 3))
    async with AsyncExitStack() as stack:
        etcd = await stack.enter_async_context(EtcdCluster(1, lease_ttl_s=ttl))
        results["etcd"] = summary(await failover_times(etcd.url, args.trials, ttl / 3))
    results["etcd_over_zmq"] = round(results["etcd"]["median_s"] / results["zmq"]["median_s"], 2)
    return {"lease_ttl_s": ttl, "heartbeat_interval_s": round(ttl / 3, 3), **results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lease-ttl-s", type=int, default=2,
                        help="lease TTL of both backends (whole seconds: etcd's unit)")
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    json.dump(asyncio.run(run(args)), sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
