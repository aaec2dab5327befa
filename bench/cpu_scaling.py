"""How far N single-threaded Python processes scale on this host: the ceiling of a worker-process sweep.

Each process runs the same fixed CPU-bound loop (JSON decode of an OpenAI request body, a dict
built from it, msgpack encode and decode: a gateway's kind of work, no I/O), all N started
together; the aggregate rate at N over the rate at 1 is the scaling the host itself allows
(shared physical cores with SMT, shared caches, turbo clocks falling as more cores run).  A
worker sweep on the same host cannot scale better than this row at the same N, and less when
other processes (fakes, load generators) share the cores.

    python -m bench.cpu_scaling --procs 1,2,4,8,16 --seconds 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time

import msgspec

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello there " * 8}], "max_tokens": 16,
                   "stream": True, "temperature": 0.0}).encode()


def work(iterations: int) -> None:
    """The unit of work each process repeats: parse a request, build a message, encode and decode it."""
    for _ in range(iterations):
        body = msgspec.json.decode(BODY)
        msg = {"request_id": "r", "prompt": body["messages"][0]["content"], "max_tokens": body["max_tokens"],
               "stream": body["stream"], "sampling": {"temperature": body["temperature"]}}
        msgspec.msgpack.decode(msgspec.msgpack.encode(msg))


def _run(barrier, seconds: float, results) -> None:
    barrier.wait()
    start, done = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        work(200)
        done += 200
    results.put(done / (time.perf_counter() - start))


def rate(n: int, seconds: float) -> float:
    """Units of work a second of ``n`` processes together."""
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_run, args=(barrier, seconds, results)) for _ in range(n)]
    for p in procs:
        p.start()
    total = sum(results.get(timeout=seconds + 60) for _ in procs)
    for p in procs:
        p.join()
    return total


def smt_siblings() -> int:
    """Logical CPUs per physical core of CPU 0 (1 without SMT)."""
    try:
        with open("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list") as f:
            text = f.read().strip()
    except OSError:
        return 1
    return sum(int(b) - int(a) + 1 if "-" in part else 1
               for part in text.split(",") for a, _, b in [part.partition("-")])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", default="1,2,4,8", help="comma-separated process counts (default 1,2,4,8)")
    p.add_argument("--seconds", type=float, default=2.0, help="each count's run length (default 2)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    counts = [int(n) for n in args.procs.split(",")]
    cpus = len(os.sched_getaffinity(0))
    print(f"{cpus} CPUs usable, {smt_siblings()} logical CPU(s) per physical core")
    rate(1, args.seconds)  # warm-up: clocks and caches settle before the baseline
    base = rate(1, args.seconds)
    rows = []
    for n in counts:
        r = base if n == 1 else rate(n, args.seconds)
        rows.append({"procs": n, "rate": r, "scaling": r / base, "per_proc": r / base / n})
        print(f"{n:3d} processes: {r:12,.0f} units/s  scaling {r / base:5.2f}  ({r / base / n:.2f} of one each)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpus": cpus, "smt_siblings": smt_siblings(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
