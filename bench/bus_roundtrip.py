"""Bus round trips against the raw pyzmq floor, in the same run.

Both sides run on one uvloop event loop over TCP loopback, one request in
flight at a time, so the figure is per-message cost rather than parallelism:

* raw: a zmq.asyncio DEALER sends a ``--size``-byte frame, a ROUTER echoes it;
* bus: ``BusClient.call(Abort(request_id=<size bytes>))`` to a ``BusServer``
  handler returning ``Ack``: framing, msgpack, typed dispatch, a handler task.

    python bench/bus_roundtrip.py --seconds 3 --size 64
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import zmq
import zmq.asyncio

from common.bus import BusClient, BusServer
from common.messages import Abort, Ack, EngineRequest
from common.service import new_event_loop


def summarize(name: str, latencies: list[float], seconds: float) -> dict:
    lat = sorted(latencies)
    return {
        "name": name,
        "round_trips_per_s": len(lat) / seconds,
        "p50_us": statistics.median(lat) * 1e6,
        "p99_us": lat[int(0.99 * (len(lat) - 1))] * 1e6,
    }


async def raw_pingpong(size: int, seconds: float) -> dict:
    ctx = zmq.asyncio.Context.instance()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    router.bind("tcp://127.0.0.1:*")
    dealer.connect(router.getsockopt_string(zmq.LAST_ENDPOINT))

    async def echo() -> None:
        while True:
            frames = await router.recv_multipart()
            await router.send_multipart(frames)

    echo_task = asyncio.create_task(echo())
    payload = b"x" * size
    for _ in range(200):  # warm-up: connection set-up
        await dealer.send(payload)
        await dealer.recv()
    latencies = []
    start = time.perf_counter()
    while (now := time.perf_counter()) - start < seconds:
        await dealer.send(payload)
        await dealer.recv()
        latencies.append(time.perf_counter() - now)
    elapsed = time.perf_counter() - start
    echo_task.cancel()
    router.close(linger=0)
    dealer.close(linger=0)
    return summarize("raw pyzmq", latencies, elapsed)


async def bus_pingpong(size: int, seconds: float) -> dict:
    server = BusServer("tcp://127.0.0.1:0", EngineRequest, name="bench")

    async def on_abort(msg: Abort) -> Ack:
        return Ack()

    server.on(Abort, on_abort)
    await server.start()
    client = BusClient(server.endpoint)
    msg = Abort(request_id="x" * size)
    for _ in range(200):
        await client.call(msg)
    latencies = []
    start = time.perf_counter()
    while (now := time.perf_counter()) - start < seconds:
        await client.call(msg)
        latencies.append(time.perf_counter() - now)
    elapsed = time.perf_counter() - start
    await client.close()
    await server.close()
    return summarize("pdserve bus", latencies, elapsed)


async def main(args: argparse.Namespace) -> None:
    results = []
    for _ in range(args.rounds):  # interleave to spread machine noise over both
        results.append((await raw_pingpong(args.size, args.seconds), await bus_pingpong(args.size, args.seconds)))
    raw = max((r for r, _ in results), key=lambda r: r["round_trips_per_s"])
    bus = max((b for _, b in results), key=lambda b: b["round_trips_per_s"])
    for r in (raw, bus):
        print(f"{r['name']:12s} {r['round_trips_per_s']:9.0f} rt/s  p50 {r['p50_us']:7.1f} us  p99 {r['p99_us']:7.1f} us")
    print(f"bus / raw round-trip rate: {bus['round_trips_per_s'] / raw['round_trips_per_s']:.2f} (goal >= 0.70)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0, help="measuring time per variant and round")
    p.add_argument("--size", type=int, default=64, help="payload bytes per message")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each is reported")
    args = p.parse_args()
    loop = new_event_loop()
    loop.run_until_complete(main(args))
