"""Bus round trips against the raw pyzmq floor, in the same run.

Both sides run on one uvloop event loop over TCP loopback, one request in
flight at a time, so the figure is per-message cost rather than parallelism:

* raw: a zmq.asyncio DEALER sends a ``--size``-byte frame, a ROUTER echoes it;
* bus: ``BusClient.call(Abort(request_id=<size bytes>))`` to a ``BusServer``
  handler returning ``Ack``: framing, msgpack, typed dispatch, a handler task;
* with ``--curve``, the bus again with CURVE on both sockets (throwaway keys,
  the ZAP handler admitting the client's role): the price of encryption.

    python bench/bus_roundtrip.py --seconds 3 --size 64 [--curve]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time

import zmq
import zmq.asyncio

from common.bus import BusClient, BusServer, curve
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


async def bus_pingpong(size: int, seconds: float, keys: curve.Keys | None = None) -> dict:
    """Round trips over the bus, with CURVE when ``keys`` are given (an engine's: it dials itself)."""
    curve.use(keys)
    server = BusServer("tcp://127.0.0.1:0", EngineRequest, name="bench", admits=frozenset({"engine"}))

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
    curve.use(None)
    return summarize("bus + CURVE" if keys else "pdserve bus", latencies, elapsed)


async def main(args: argparse.Namespace) -> None:
    keys = curve.load_keys(curve.create_keys(tempfile.mkdtemp(prefix="bench-keys-"))["engine"]) if args.curve else None
    results = []
    for _ in range(args.rounds):  # interleave to spread machine noise over every variant
        round_ = [await raw_pingpong(args.size, args.seconds), await bus_pingpong(args.size, args.seconds)]
        if keys is not None:
            round_.append(await bus_pingpong(args.size, args.seconds, keys))
        results.append(round_)
    raw, bus, *secure = (max(variant, key=lambda r: r["round_trips_per_s"]) for variant in zip(*results))
    for r in (raw, bus, *secure):
        print(f"{r['name']:12s} {r['round_trips_per_s']:9.0f} rt/s  p50 {r['p50_us']:7.1f} us  p99 {r['p99_us']:7.1f} us")
    print(f"bus / raw round-trip rate: {bus['round_trips_per_s'] / raw['round_trips_per_s']:.2f} (goal >= 0.70)")
    for r in secure:
        print(f"bus with CURVE / without, round-trip rate: {r['round_trips_per_s'] / bus['round_trips_per_s']:.2f}; "
              f"p50 {r['p50_us'] / bus['p50_us']:.2f}x")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0, help="measuring time per variant and round")
    p.add_argument("--size", type=int, default=64, help="payload bytes per message")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each is reported")
    p.add_argument("--curve", action="store_true", help="also the bus with CURVE, in the same rounds")
    args = p.parse_args()
    loop = new_event_loop()
    loop.run_until_complete(main(args))
