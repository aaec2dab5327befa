"""The latency ladder of one gateway leg, across processes, one request in flight (issue 16's p50 goal).

Each rung adds one layer between two processes on loopback, the client here on uvloop, the server a child:

* ``tcp``: a 100-byte echo over a plain TCP stream, both ends uvloop (an HTTP router's leg, less its HTTP);
* ``zmq``: the same bytes DEALER -> ROUTER and back, the server a blocking ``recv``/``send`` loop: libzmq's
  I/O threads on both sides;
* ``bus``: ``BusClient.call`` to a ``BusServer`` answering ``Ack``: the bus's readers, outboxes, framing,
  msgpack and a handler task on both ends;
* ``engine stats``: ``GetStats`` to an instant fake engine (``bench.fakes.instant``: a ``FakeEngine`` with its
  registration and heartbeats), ``engine prefill`` / ``engine decode``: the two ``Generate`` legs the
  gateway sends it, streamed as the gateway streams them.

Rungs alternate ``--rounds`` times; each reports p50 and mean over every round, and its p50 over the rung
below it.  The gateway's own legs add its flow around these (``bench.router_compare``'s ``split_at_one``).
Back to back, every process stays awake; ``--idle-us`` sleeps between round trips, so each one starts on
processes (and libzmq I/O threads) gone idle, as behind a router at one request in flight.

    python -m bench.bus_legs --requests 2000 --rounds 3
    python -m bench.bus_legs --requests 2000 --rounds 3 --idle-us 500
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack

import zmq

from bench.cli import bench_parser, run_bench
from bench.processes import free_port, tcp
from bench.gateway_overhead import spawn
from common.bus import BusClient, BusServer
from common.messages import Ack, GetStats, Generate, ListInstances, SamplingParams
from common.service import new_event_loop

PAYLOAD = b"x" * 100
RUNGS = ("tcp", "zmq", "bus", "engine stats", "engine prefill", "engine decode")


async def serve(kind: str, port: int) -> None:
    """The echo server of rung ``kind`` (a child process of the benchmark)."""
    if kind == "zmq":
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.bind(tcp(port))
        while True:  # blocking: no event loop between libzmq and the echo
            sock.send_multipart(sock.recv_multipart())
    elif kind == "tcp":
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(65536):
                writer.write(data)

        await asyncio.start_server(echo, "127.0.0.1", port)
    else:
        server = BusServer(tcp(port), GetStats, name="bus-legs")

        async def ack(_: GetStats) -> Ack:
            return Ack()

        server.on(GetStats, ack)
        await server.start()
    await asyncio.Event().wait()


async def timed(once: Callable[[], Awaitable[object]], requests: int, idle_s: float = 0.0) -> list[float]:
    """``requests`` timed round trips; between two, ``idle_s`` of this process asleep (untimed): every process
    of the rung then waits idle for the next, as the servers behind a router do at one request in flight."""
    for _ in range(requests // 10):  # warm-up: connections, caches
        await once()
    out = []
    for _ in range(requests):
        if idle_s:
            time.sleep(idle_s)  # blocking on purpose: the loop's timers are millisecond-grained
        start = time.perf_counter()
        await once()
        out.append(time.perf_counter() - start)
    return out


async def tcp_rung(port: int, timeout_s: float = 30.0) -> Callable[[], Awaitable[object]]:
    deadline = time.monotonic() + timeout_s
    while True:  # the echo child binds after its interpreter starts
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)

    async def once() -> bytes:
        writer.write(PAYLOAD)
        return await reader.readexactly(len(PAYLOAD))
    return once


def zmq_rung(port: int) -> Callable[[], Awaitable[object]]:
    """A DEALER read from the event loop as the bus reads its sockets: a reader on libzmq's FD."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(tcp(port))
    loop = asyncio.get_running_loop()
    waiter: list[asyncio.Future] = []

    def drain() -> None:
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            sock.recv()
            if waiter and not waiter[0].done():
                waiter[0].set_result(None)

    loop.add_reader(sock.getsockopt(zmq.FD), drain)

    async def once() -> None:
        waiter[:] = [loop.create_future()]
        sock.send(PAYLOAD)
        drain()  # the send may have consumed the FD's edge
        await waiter[0]
    return once


async def engine_rungs(registry: str) -> dict[str, Callable[[], Awaitable[object]]]:
    """GetStats and the two Generate legs against the instant fakes registered with ``registry``."""
    directory = BusClient(registry, server_role="registry")
    deadline = time.monotonic() + 60
    while len(instances := (await directory.call(ListInstances())).instances) < 2:
        if time.monotonic() > deadline:
            raise RuntimeError("the instant fakes did not register within 60 s")
        await asyncio.sleep(0.1)
    await directory.close()
    clients = {i.role: BusClient(i.request_endpoint) for i in instances}
    sampling, ids = SamplingParams(max_tokens=2), iter(range(10**9))
    prefilled = []

    async def prefill() -> None:
        gen = Generate(request_id=f"r{next(ids)}", sampling=sampling, prompt="hi", do_remote_decode=True)
        prefilled[:] = [out async for out in clients["prefill"].stream(gen)]

    async def decode() -> None:
        gen = Generate(request_id=f"r{next(ids)}", sampling=sampling, prompt_token_ids=[97],
                       remote_prefill=prefilled[-1].kv_transfer)
        async for _ in clients["decode"].stream(gen):
            pass

    await prefill()
    return {"engine stats": lambda: clients["prefill"].call(GetStats()), "engine prefill": prefill,
            "engine decode": decode}


async def run(args: argparse.Namespace) -> dict:
    ports = {kind: free_port() for kind in ("tcp", "zmq", "bus")}
    registry = tcp(free_port())
    with ExitStack() as stack:
        for kind, port in ports.items():
            spawn(stack, "-m", "bench.bus_legs", "--serve", kind, "--port", str(port))
        spawn(stack, "-m", "services.registry", "--bind", registry, "--log-level", "warning")
        for role in ("prefill", "decode"):
            spawn(stack, "-m", "bench.fakes.instant", "--registry", registry, "--role", role)
        bus = BusClient(tcp(ports["bus"]))
        rungs = {"tcp": await tcp_rung(ports["tcp"]), "zmq": zmq_rung(ports["zmq"]),
                 "bus": lambda: bus.call(GetStats())}
        rungs.update(await engine_rungs(registry))
        samples: dict[str, list[float]] = {name: [] for name in RUNGS}
        for _ in range(args.rounds):
            for name in RUNGS:
                samples[name] += await timed(rungs[name], args.requests, args.idle_us / 1e6)
    result = {name: {"p50_us": statistics.median(s) * 1e6, "mean_us": statistics.mean(s) * 1e6}
              for name, s in samples.items()}
    return {"requests": args.requests, "rounds": args.rounds, "idle_us": args.idle_us, "rungs": result}


def report(result: dict) -> str:
    rungs = result["rungs"]
    idle = f", {result['idle_us']} us idle between round trips" if result["idle_us"] else ", back to back"
    lines = [f"one round trip across processes, 1 in flight{idle}, {result['requests']} x {result['rounds']} rounds:",
             f"  {'rung':16s} {'p50 us':>8s} {'mean us':>8s}  p50 over the rung above"]
    previous = None
    for name in RUNGS:
        r = rungs[name]
        step = "" if previous is None else f"+{r['p50_us'] - rungs[previous]['p50_us']:.0f} us"
        lines.append(f"  {name:16s} {r['p50_us']:8.0f} {r['mean_us']:8.0f}  {step}")
        previous = name if name in ("tcp", "zmq", "bus", "engine stats") else previous
    legs = rungs["engine prefill"]["p50_us"] + rungs["engine decode"]["p50_us"]
    lines.append(f"  the two Generate legs: {legs:.0f} us, {legs - 2 * rungs['tcp']['p50_us']:.0f} us over two "
                 "TCP round trips")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = bench_parser(__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="timed round trips per rung and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the rungs alternating")
    parser.add_argument("--idle-us", type=int, default=0, help="microseconds this client sleeps between round trips "
                        "(untimed), leaving the servers idle as a router's engines are at one request in flight")
    parser.add_argument("--serve", choices=("tcp", "zmq", "bus"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        new_event_loop().run_until_complete(serve(args.serve, args.port))
        sys.exit(0)
    run_bench(args, run, report)
