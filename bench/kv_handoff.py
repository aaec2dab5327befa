"""KV handoff through the connector against one raw Mooncake read, in the same run.

Two processes on loopback, Mooncake over TCP (P2PHANDSHAKE).  The "prefill"
child (this script with ``--role prefill``) fills a KV cache with random data,
registers it, pins one lease per request and serves the KV side channel.  The
"decode" parent measures:

* raw: ``TransferEngine.transfer_sync_read`` of ONE contiguous buffer of the
  request's byte size (the floor: no handshake, no ranges, no bus);
* connector: ``KVReader.read_blocks`` (cached handshake, range merging,
  thread-pool read, status checks, background ``ReleaseKV``) of the request's
  blocks, laid out in runs as a block manager leaves them after churn;
* overhead: ``read_blocks`` wall time minus the backend's own time for the
  same read, over ``--requests`` requests (p50/p99).

Default geometry: a 2,048-token request, 16 layers x 8 KV heads x 64 head_dim,
fp16, 16-token blocks = 512 KiB per block, 128 blocks, 64 MiB per request.

    python bench/kv_handoff.py --repeats 10 --requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.serving_stats import percentile
from common.bus import BusServer
from common.engine.kv_cache import KVCache
from common.kv_transfer.config import KVTransferConfig
from common.kv_transfer.leases import LeaseTable
from common.kv_transfer.mooncake import MooncakeBackend
from common.kv_transfer.ranges import KVLayout
from common.kv_transfer.reader import KVReader
from common.kv_transfer.side_channel import KVSideChannel
from common.messages import Fingerprint, KVRequest, KVTransferParams
from common.service import new_event_loop
from services.prefill.handoff import PrefillHandoff

ROOT = Path(__file__).resolve().parent.parent


def make_cache(args: argparse.Namespace) -> KVCache:
    return KVCache(args.num_blocks, args.layers, args.block_size, args.kv_heads, args.head_dim, torch.float16, "cpu")


def fingerprint(args: argparse.Namespace) -> Fingerprint:
    return Fingerprint("bench", "float16", args.block_size, args.layers, args.kv_heads, args.head_dim,
                       KVCache.LAYOUT, "mooncake")


def block_ids(args: argparse.Namespace, seed: int) -> list[int]:
    """The request's blocks: shuffled runs of ``--run-blocks`` consecutive ids (1 = fully scattered)."""
    n = -(-args.tokens // args.block_size)
    runs = [list(range(s, s + args.run_blocks)) for s in range(0, args.num_blocks, args.run_blocks)]
    random.Random(seed).shuffle(runs)
    return [b for run in runs for b in run][:n]


async def serve_prefill(args: argparse.Namespace) -> None:
    kv = make_cache(args)
    kv.data.copy_(torch.randn(kv.data.shape, dtype=torch.float32).to(torch.float16))
    backend = MooncakeBackend("127.0.0.1", force_tcp=True)
    layout = KVLayout.of(kv)
    backend.register([layout.region])
    handoff = PrefillHandoff("prefill-0", LeaseTable(3600.0), lambda transfer_id: asyncio.sleep(0))
    for i in range(args.transfers):
        handoff.begin(f"t{i}")
        handoff.lease(f"t{i}")
    channel = KVSideChannel("prefill-0", fingerprint(args), backend, layout, handoff)
    server = BusServer("tcp://127.0.0.1:0", KVRequest, name="kv-prefill")
    channel.attach(server)
    await server.start()
    print(json.dumps({"endpoint": server.endpoint, "session": backend.session, "base": layout.base_addr}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    await server.close()
    backend.close()


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


async def run_decode(args: argparse.Namespace) -> None:
    total = args.repeats + args.requests + 1
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.kv_handoff", "--role", "prefill", "--transfers", str(total),
         *[f"--{k.replace('_', '-')}={v}" for k, v in geometry(args).items()]],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        peer = json.loads(await asyncio.get_running_loop().run_in_executor(None, child.stdout.readline))
        await measure(args, peer)
    finally:
        child.stdin.close()
        child.wait(timeout=30)


async def measure(args: argparse.Namespace, peer: dict) -> None:
    kv = make_cache(args)
    backend = MooncakeBackend("127.0.0.1", force_tcp=True)
    layout = KVLayout.of(kv)
    backend.register([layout.region])
    config = KVTransferConfig(kv_transfer_threads=max(2, args.shards), kv_read_shards=args.shards)
    config.validate()
    conn = KVReader(backend, "decode-0", fingerprint(args), layout, config)
    remote, local = block_ids(args, seed=1), block_ids(args, seed=2)
    nbytes = len(remote) * kv.block_bytes
    ids = iter(range(10**9))

    def params() -> KVTransferParams:
        return KVTransferParams("prefill-0", peer["endpoint"], f"prefill-0/t{next(ids)}", remote, args.tokens, 0,
                                time.time() + 3600)

    def raw_read() -> float:
        start = time.perf_counter()
        rc = backend.engine.transfer_sync_read(peer["session"], layout.base_addr, peer["base"], nbytes)
        if rc < 0:
            raise RuntimeError(f"raw transfer_sync_read failed: {rc}")
        return time.perf_counter() - start

    try:
        raw_read()  # warm-up: connection set-up on both paths
        await conn.read_blocks(params(), local)
        raw_s, conn_s, ranges = [], [], 0
        for _ in range(args.repeats):  # interleaved so both see the same machine state
            raw_s.append(raw_read())
            start = time.perf_counter()
            stats = await conn.read_blocks(params(), local)
            conn_s.append(time.perf_counter() - start)
            ranges = stats.num_ranges
        overhead = []
        for _ in range(args.requests):
            start = time.perf_counter()
            stats = await conn.read_blocks(params(), local)
            overhead.append(time.perf_counter() - start - stats.seconds)
        await conn.releases.flush()
    finally:
        await conn.close()
        backend.close()

    raw_gbps = gbps(nbytes, statistics.median(raw_s))
    conn_gbps = gbps(nbytes, statistics.median(conn_s))
    print(f"request: {args.tokens} tokens, {len(remote)} blocks x {kv.block_bytes // 1024} KiB = "
          f"{nbytes / 2**20:.0f} MiB in {ranges} merged ranges; {args.shards} shard(s); Mooncake TCP loopback")
    print(f"raw transfer_sync_read (1 contiguous range): median {raw_gbps:6.2f} GB/s over {args.repeats} runs")
    print(f"connector read_blocks:                     median {conn_gbps:6.2f} GB/s over {args.repeats} runs")
    print(f"connector / raw: {conn_gbps / raw_gbps:.2f} (goal >= 0.70)")
    ms = [s * 1000 for s in overhead]
    print(f"connector overhead (read_blocks - backend time) over {len(ms)} requests: "
          f"p50 {percentile(ms, 50):.3f} ms, p99 {percentile(ms, 99):.3f} ms")


def geometry(args: argparse.Namespace) -> dict:
    keys = ("tokens", "layers", "kv_heads", "head_dim", "block_size", "num_blocks", "run_blocks")
    return {k: getattr(args, k) for k in keys}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=("decode", "prefill"), default="decode")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=256, help="KV cache size of each engine, in blocks")
    p.add_argument("--run-blocks", type=int, default=8, help="consecutive blocks per run in the block lists")
    p.add_argument("--repeats", type=int, default=10, help="runs of raw vs connector for the GB/s medians")
    p.add_argument("--requests", type=int, default=200, help="requests for the overhead percentiles")
    p.add_argument("--shards", type=int, default=1, help="--kv-read-shards of the connector")
    p.add_argument("--transfers", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if -(-args.tokens // args.block_size) > args.num_blocks:
        p.error("--num-blocks is too small for --tokens")
    return args


if __name__ == "__main__":
    args = parse_args()
    loop = new_event_loop()
    loop.run_until_complete(serve_prefill(args) if args.role == "prefill" else run_decode(args))
