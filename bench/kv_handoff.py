"""KV handoff through the connector over each KV transport, against the copy limit of the same bytes, in one run.

Two processes per transport, as two engines on one host.  The "prefill" child
(this module with ``--role prefill``) allocates its KV cache as an engine does
(in a ``/dev/shm`` file for ``shm``, on the GPU for ``--device cuda``), fills
it with random data, opens a ``TransportSet`` with ``kv_transport`` forced to
the transport measured, pins one lease per request and serves the KV side
channel.  The "decode" parent builds its side the same way and measures,
interleaved so that every figure sees the same machine state:

* connector: ``KVReader.read_blocks`` (cached handshake, range merging,
  thread-pool read, status checks, lease confirmation, background
  ``ReleaseKV``) of the request's blocks, laid out in runs as a block manager
  leaves them after churn;
* raw (``tcp`` only): Mooncake's ``transfer_sync_read`` of ONE contiguous
  buffer of the request's size (no handshake, no ranges, no bus);
* limit: the same bytes copied inside one process.  On CPU two ways, and the
  limit is the faster: ``memmove`` (``ctypes.memmove`` of the request's byte
  ranges between two private KV caches, what a shm read does minus the second
  process) and ``copy`` (torch ``copy_`` of one contiguous buffer, which may
  use several threads).  On GPU: ``copy`` (a device-to-device uint8 ``copy_``
  of one contiguous buffer, timed by CUDA events: the device's own rate) and
  ``copy_waited`` (the same copy timed as the connector is: a host timer round
  its launch and wait), in alternating order; the limit is the faster;
* backend: the transport's own read inside ``read_blocks`` (``ReadStats.seconds``);
* overhead: ``read_blocks`` wall time minus the backend's own time for the
  same read, over ``--requests`` requests (p50/p99);
* planning: ``ranges.token_ranges`` of the request alone (p50), back to back
  and right after a limit copy (caches cold, as after a read on CPU);
* same-host transports (shm, nvlink): every connector read is made three
  times, interleaved, with the lease confirmed in the prefill's shared-memory
  lease table after a claim sent before the read began (as ``DecodeHandoff``
  sends it, during the block allocation: the connector's figures), the same
  with the claim sent with the read (``claim in read``), and, as before the
  table existed, by a ``RenewLease`` round trip after the read (``bus``);
* with ``--decode-block-size`` other than ``--block-size`` and/or ``--decode-tp``
  other than ``--tp``: also a second decode instance of that block size / TP
  size reading the same prompt from the same prefill (token positions mapped,
  each decode rank reading the heads it owns), interleaved with the homogeneous
  reads, its GB/s as a fraction of theirs (goal >= 0.8).  A decode instance's
  ranks 1.. are child processes reading through their ``RankAgent`` (ZMQ), as
  an engine's worker ranks do.

Default geometry: a 2,048-token request, 16 layers x 8 KV heads x 64 head_dim,
fp16, 16-token blocks = 512 KiB per block, 128 blocks, 64 MiB per request
(a Llama-3.2-1B-shaped model's KV of 2,048 tokens).

    python -m bench.kv_handoff --transport all                   # CPU: tcp and shm vs memcpy, one run
    python -m bench.kv_handoff --device cuda --transport nvlink  # one GPU: CUDA IPC vs a device copy
    python -m bench.kv_handoff --transport shm --decode-block-size 32  # CPU: 16 -> 32 vs 16 -> 16
    python -m bench.kv_handoff --transport shm --decode-tp 2           # CPU: TP 1 -> TP 2 vs TP 1 -> TP 1
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import torch

from bench.cli import bench_parser, run_bench
from bench.serving_stats import percentile
from common.arith import ceil_div
from common.bus import BusServer
from common.client_pool import ClientPool
from common.engine.kv_cache import KVCache, zeros
from common.engine.parallel import TensorParallel
from common.engine.tp_workers import rank_device
from common.kv_transfer.config import KVTransferConfig
from common.kv_transfer.lease_slots import LeaseSlots
from common.kv_transfer.leases import LeaseTable
from common.kv_transfer.ranges import BlockTable, ByteRanges, KVLayout, token_ranges
from common.kv_transfer.reader import KVReader, ReadStats
from common.kv_transfer.side_channel import KVSideChannel
from common.kv_transfer.rank_agent import RankAgent, RankAgentInfo
from common.kv_transfer.rank_io import LocalRankIO, RemoteRankIO
from common.kv_transfer.shm import SharedKVFile
from common.kv_transfer.transport_set import shared_kv_file
from common.kv_transfer.transports import SAME_HOST
from common.messages import Fingerprint, KVRequest, KVTransferParams
from common.service import new_event_loop
from services.prefill.handoff import PrefillHandoff

ROOT = Path(__file__).resolve().parent.parent
ALL = {"cpu": ("tcp", "shm"), "cuda": ("nvlink", "tcp")}  # --transport all, by device type
GOAL = 0.50  # connector / limit (issue 11)
HETERO_GOAL = 0.80  # a read across block sizes / a homogeneous read of the same bytes (issue 12)


class BenchEngineKV:
    """One engine instance's KV, built as an engine builds it: ``tp`` ranks, each a cache of its slice of the
    KV heads (in a ``/dev/shm`` file where shm serves it) registered with its own transports."""

    def __init__(self, args: argparse.Namespace, transport: str, tp: int = 1, ranks: list[int] | None = None):
        """Builds ``ranks`` of the ``tp`` (default: all of them)."""
        self.config = KVTransferConfig(kv_transport=transport, kv_transfer_threads=max(2, args.shards),
                                       kv_read_shards=args.shards)
        self.config.validate()
        self.files: list[SharedKVFile] = []
        self.caches: list[KVCache] = []
        self.ranks: list[LocalRankIO] = []
        try:
            for rank in range(tp) if ranks is None else ranks:
                heads = TensorParallel(rank, tp).kv_heads(args.kv_heads)
                file = shared_kv_file(self.config, torch.device(args.device))
                if file is not None:
                    self.files.append(file)
                device = rank_device(torch.device(args.device), rank)  # on CUDA: rank r on the r-th GPU
                kv = make_cache(args, file.allocate if file else zeros, num_kv_heads=heads[1], device=device)
                self.caches.append(kv)
                self.ranks.append(LocalRankIO.open(self.config, rank, heads, kv.data, KVLayout.of(kv), tp))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for rank in self.ranks:
            rank.close()
        for file in self.files:
            file.close()


def make_cache(args: argparse.Namespace, allocate=zeros, num_kv_heads: int = 0,
               device: torch.device | None = None) -> KVCache:
    """A cache of ``args``' geometry holding ``num_kv_heads`` heads (0: all of ``--kv-heads``) on ``device``
    (default ``--device``)."""
    return KVCache(args.num_blocks, args.layers, args.block_size, num_kv_heads or args.kv_heads, args.head_dim,
                   torch.float16, device or args.device, allocate)


def fill_random(kv: KVCache) -> None:
    """Random values, written (on a GPU: synchronised) when this returns, so another process may read them."""
    kv.data.copy_(torch.randn(kv.data.shape, dtype=torch.float32, device=kv.data.device).to(torch.float16))
    if kv.data.is_cuda:
        torch.cuda.synchronize(kv.data.device)


def hetero_args(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` of the other decode engine (``--decode-block-size``, ``--decode-tp``) of a heterogeneous read."""
    return argparse.Namespace(**{**vars(args), "block_size": args.decode_block_size or args.block_size,
                                 "tp": args.decode_tp or args.tp})


def is_hetero(args: argparse.Namespace) -> bool:
    return args.decode_block_size not in (0, args.block_size) or args.decode_tp not in (0, args.tp)


def fingerprint(args: argparse.Namespace) -> Fingerprint:
    return Fingerprint("bench", "float16", args.block_size, args.layers, args.kv_heads, args.head_dim,
                       KVCache.LAYOUT, "mooncake", args.tp)


def block_ids(args: argparse.Namespace, seed: int) -> list[int]:
    """The request's blocks: shuffled runs of ``--run-blocks`` consecutive ids (1 = fully scattered)."""
    runs = [list(range(s, s + args.run_blocks)) for s in range(0, args.num_blocks, args.run_blocks)]
    random.Random(seed).shuffle(runs)
    return [b for run in runs for b in run][:ceil_div(args.tokens, args.block_size)]


async def serve_prefill(args: argparse.Namespace) -> None:
    engine = BenchEngineKV(args, args.transport, args.tp)
    slots = LeaseSlots("prefill-0", num_slots=args.transfers)
    try:
        for kv in engine.caches:
            fill_random(kv)
        handoff = PrefillHandoff("prefill-0", LeaseTable(3600.0), lambda transfer_id: asyncio.sleep(0), slots=slots)
        transfer_ids = [handoff.begin(f"t{i}", b"bench") for i in range(args.transfers)]
        for i in range(args.transfers):
            handoff.lease(f"t{i}", block_ids(args, seed=1))
        channel = KVSideChannel("prefill-0", fingerprint(args), [rank.memory for rank in engine.ranks],
                                engine.ranks[0].transports.incarnation, handoff, slots.name)
        server = BusServer("tcp://127.0.0.1:0", KVRequest, name="kv-prefill")
        channel.attach(server)
        await server.start()
        rank0 = engine.ranks[0]
        sessions = {name: backend.session for name, backend in rank0.transports.backends.items()}
        print(json.dumps({"endpoint": server.endpoint, "sessions": sessions, "base": rank0.memory.region.addr,
                          "transfer_ids": transfer_ids, "slots": [handoff.lease_slot(t) for t in transfer_ids]}),
              flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
        await server.close()
    finally:
        slots.close()
        engine.close()


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def wall_timer(work: Callable[[], object]) -> Callable[[], float]:
    """``work`` made to return its wall time in seconds (it must be done when it returns)."""

    def timed() -> float:
        start = time.perf_counter()
        work()
        return time.perf_counter() - start

    return timed


def device_timer(work: Callable[[], object]) -> Callable[[], float]:
    """``work`` (kernels on the current CUDA stream) made to return its GPU time in seconds, by CUDA events:
    no launch or synchronisation latency counts, so the limit it gives is the device's own rate."""

    def timed() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        work()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return timed


class RangeCopy:
    """``ctypes.memmove`` of a request's ranges from one private KV cache into another (what a shm read
    does, in one process)."""

    def __init__(self, args: argparse.Namespace, ranges_of: Callable[[int, int], ByteRanges]):
        self.source, self.target = make_cache(args), make_cache(args)
        fill_random(self.source)
        self.ranges = ranges_of(self.target.data.data_ptr(), self.source.data.data_ptr())

    def __call__(self) -> None:
        for la, ra, n in zip(*self.ranges):
            ctypes.memmove(la, ra, n)


def limit_copies(args: argparse.Namespace, ranges_of: Callable[[int, int], ByteRanges], nbytes: int
                 ) -> dict[str, Callable[[], float]]:
    """The request's bytes copied in this process, by method name; each call returns seconds.

    ``ranges_of(local_base, remote_base)`` is the request's ranges between two caches of the geometry.
    """
    source = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=args.device)
    target = torch.zeros_like(source)
    if source.is_cuda:  # one copy timed two ways: on the device (events), and as its caller waits for it
        return {"copy": device_timer(lambda: target.copy_(source)),
                "copy_waited": wall_timer(lambda: (target.copy_(source), torch.cuda.current_stream().synchronize()))}
    return {"copy": wall_timer(lambda: target.copy_(source)), "memmove": wall_timer(RangeCopy(args, ranges_of))}


async def run_decode(args: argparse.Namespace) -> dict:
    remote, local = block_ids(args, seed=1), block_ids(args, seed=2)
    block_bytes = KVCache.bytes_per_block(args.layers, args.block_size, args.kv_heads, args.head_dim, torch.float16)

    def ranges_of(local_base: int, remote_base: int) -> ByteRanges:
        def side(base: int, ids: list[int]) -> BlockTable:
            return BlockTable(KVLayout(base, block_bytes, args.num_blocks), args.block_size, ids, 0, args.kv_heads)

        return token_ranges(side(local_base, local), side(remote_base, remote), heads=range(args.kv_heads),
                            num_tokens=args.tokens)

    nbytes = len(remote) * block_bytes
    limits = limit_copies(args, ranges_of, nbytes)
    limit_s: dict[str, list[float]] = {name: [] for name in limits}
    transports = ALL[torch.device(args.device).type] if args.transport == "all" else (args.transport,)
    results = {}
    for transport in transports:
        peer, child = await start_prefill(args, transport)
        try:
            results[transport] = await measure(args, transport, peer, remote, local, limits, limit_s)
        finally:
            child.stdin.close()
            child.wait(timeout=30)
    limit_gbps = {name: gbps(nbytes, statistics.median(s)) for name, s in limit_s.items()}
    limit_name = max(limit_gbps, key=limit_gbps.get)  # the faster copy
    limit = limit_gbps[limit_name]
    plan = wall_timer(lambda: ranges_of(0, 0))
    planning_us = {"warm": statistics.median(plan() * 1e6 for _ in range(args.requests)),
                   "after_copy": statistics.median([next(iter(limits.values()))(), plan() * 1e6][1]
                                                   for _ in range(args.repeats))}
    for result in results.values():
        result["of_limit"] = result["connector_gbps"] / limit
    return {"setup": {"device": args.device, "tokens": args.tokens, "blocks": len(remote),
                      "block_size": args.block_size, "decode_block_size": args.decode_block_size or args.block_size,
                      "tp": args.tp, "decode_tp": args.decode_tp or args.tp,
                      "block_bytes": block_bytes, "bytes": nbytes,
                      "ranges": len(ranges_of(0, 0).lengths), "shards": args.shards, "repeats": args.repeats,
                      "requests": args.requests},
            "limit_gbps": limit_gbps, "limit": limit_name, "transports": results,
            "planning_us": planning_us}


async def start_child(args: argparse.Namespace, role: str, transport: str, *flags: str
                      ) -> tuple[str, subprocess.Popen]:
    """A child of ``role`` (``prefill``, or ``decode-rank``: a decode instance's worker rank) serving
    ``transport`` with ``args``' geometry, and the JSON line it printed once ready; it runs until its stdin
    closes."""
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.kv_handoff", "--role", role, "--transport", transport, "--device", args.device,
         *[f"--{k.replace('_', '-')}={v}" for k, v in geometry(args).items()], *flags],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    line = await asyncio.get_running_loop().run_in_executor(None, child.stdout.readline)
    if not line:
        child.stdin.close()
        raise RuntimeError(f"the {transport} {role} child exited with {child.wait()} before it was ready")
    return line, child


async def start_prefill(args: argparse.Namespace, transport: str) -> tuple[dict, subprocess.Popen]:
    """The prefill child serving ``transport``, with a lease for every read the measurement makes."""
    line, child = await start_child(args, "prefill", transport, "--transfers",
                                    str(4 * (args.repeats + 1) + 3 * args.requests))
    return json.loads(line), child


async def serve_decode_rank(args: argparse.Namespace) -> None:
    """Worker rank ``--rank`` of a decode instance: its KV registered and its agent serving, as in an engine."""
    engine = BenchEngineKV(args, args.transport, args.tp, ranks=[args.rank])
    agent = RankAgent(engine.ranks[0])
    try:
        print(msgspec.json.encode(RankAgentInfo(agent.io.memory, agent.start())).decode(), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    finally:
        agent.close()  # and its transports
        engine.close()


class DecodeSide:
    """A decode instance's KV and reader (``args``' geometry and TP size), reading the request into ``local``.

    Rank 0 reads in this process; ranks 1.. are child processes (``--role decode-rank``) reading through
    their ``RankAgent`` over ZMQ, as the worker ranks of an engine do.  ``open`` builds one.
    """

    def __init__(self, engine: BenchEngineKV, workers: list[tuple[RankAgentInfo, subprocess.Popen]],
                 args: argparse.Namespace, transport: str, local: list[int]):
        self.engine = engine
        self.workers = [child for _, child in workers]
        self.clients = ClientPool(name="bench-ranks", timeout=engine.config.kv_rpc_timeout_s)
        ranks = [engine.ranks[0], *(RemoteRankIO(info.memory, info.endpoint, self.clients, engine.config)
                                    for info, _ in workers)]
        self.chosen: dict[str, str] = {}
        self.reader = KVReader(ranks, "decode-0", fingerprint(args), engine.config, self.chosen)
        self.local = local
        self.transport = transport

    @classmethod
    async def open(cls, args: argparse.Namespace, transport: str, local: list[int]) -> DecodeSide:
        workers = []
        for rank in range(1, args.tp):
            line, child = await start_child(args, "decode-rank", transport, f"--rank={rank}")
            workers.append((msgspec.json.decode(line, type=RankAgentInfo), child))
        return cls(BenchEngineKV(args, transport, args.tp, ranks=[0]), workers, args, transport, local)

    async def timed_read(self, params: KVTransferParams) -> tuple[float, ReadStats]:
        """``read_blocks``' wall time in seconds, and its stats."""
        start = time.perf_counter()
        stats = await self.reader.read_blocks(params, self.local)
        return time.perf_counter() - start, stats

    async def close(self) -> None:
        """Flush the releases and close; raises when the reader did not use the forced transport."""
        try:
            await self.reader.releases.flush()
            chosen = self.chosen.get("prefill-0")
        finally:
            await self.reader.close()
            await self.clients.close()
            for child in self.workers:
                child.stdin.close()
                child.wait(timeout=30)
            self.engine.close()
        if chosen != self.transport:
            raise RuntimeError(f"the reader chose {chosen}, not the forced {self.transport}")


async def measure(args: argparse.Namespace, transport: str, peer: dict, remote: list[int], local: list[int],
                  limits: dict[str, Callable[[], float]], limit_s: dict[str, list[float]]) -> dict:
    """Connector reads over ``transport`` (and raw Mooncake reads for tcp, and reads by a decode of
    ``--decode-block-size``), each repeat also timing every limit copy into ``limit_s``."""
    decode = await DecodeSide.open(args, transport, local)
    hetero = None
    if is_hetero(args):
        other = hetero_args(args)
        hetero = await DecodeSide.open(other, transport, block_ids(other, seed=3))
    nbytes = len(remote) * decode.engine.caches[0].block_bytes
    leased = iter(zip(peer["transfer_ids"], peer["slots"]))
    confirmations = ("table", "claim_in_read", "bus") if transport in SAME_HOST.values() else ("bus",)

    def params(confirm: str = confirmations[0]) -> KVTransferParams:
        """The next lease; ``bus``: without its lease-table slot, so the reader confirms it by a round trip."""
        transfer_id, (slot, generation) = next(leased)
        return KVTransferParams("prefill-0", peer["endpoint"], transfer_id, remote,
                                args.tokens, 0, time.time() + 3600, block_size=args.block_size,
                                tensor_parallel_size=args.tp, lease_slot=slot if confirm != "bus" else -1,
                                lease_generation=generation)

    async def timed_read(confirm: str) -> tuple[float, ReadStats]:
        read = params(confirm)
        if confirm == "table":
            await decode.reader.claim(read)  # answered before the read starts, as during a block allocation
        return await decode.timed_read(read)

    def raw_read() -> None:
        backend = decode.engine.ranks[0].transports.backends["tcp"]
        rc = backend.engine.transfer_sync_read(peer["sessions"]["tcp"], decode.engine.ranks[0].memory.region.addr,
                                               peer["base"], nbytes)
        if rc < 0:
            raise RuntimeError(f"raw transfer_sync_read failed: {rc}")

    raw = wall_timer(raw_read) if transport == "tcp" else None
    try:
        if raw is not None:
            raw()  # warm-up: connection set-up on both paths
        for side in filter(None, (decode, hetero)):
            await side.timed_read(params())
        raw_s, hetero_s, hetero_backend_s, ranges, hetero_ranges = [], [], [], 0, 0
        conn_s: dict[str, list[float]] = {c: [] for c in confirmations}
        backend_s: dict[str, list[float]] = {c: [] for c in confirmations}
        hetero_bytes = 0
        for i in range(args.repeats):
            for name, copy in list(limits.items())[::1 - 2 * (i % 2)]:  # alternated: each follows the other
                limit_s[name].append(copy())
            if raw is not None:
                raw_s.append(raw())
            for confirm in confirmations[::1 - 2 * (i % 2)]:  # alternated: none always follows the copies
                seconds, stats = await timed_read(confirm)
                conn_s[confirm].append(seconds)
                backend_s[confirm].append(stats.seconds)
                ranges = stats.num_ranges
            if hetero is not None:
                seconds, stats = await hetero.timed_read(params())
                hetero_s.append(seconds)
                hetero_backend_s.append(stats.seconds)
                hetero_ranges, hetero_bytes = stats.num_ranges, stats.bytes
        overhead_ms: dict[str, list[float]] = {c: [] for c in confirmations}
        for i in range(args.requests):
            for confirm in confirmations[::1 - 2 * (i % 2)]:
                seconds, stats = await timed_read(confirm)
                overhead_ms[confirm].append((seconds - stats.seconds) * 1e3)
    finally:
        for side in filter(None, (decode, hetero)):
            await side.close()
    result = {"ranges": ranges}
    for confirm in confirmations:  # the first one's figures are the connector's; "<confirm>_..." the others'
        prefix = f"{confirm}_" if confirm != confirmations[0] else ""
        result.update({f"{prefix}connector_gbps": gbps(nbytes, statistics.median(conn_s[confirm])),
                       f"{prefix}backend_gbps": gbps(nbytes, statistics.median(backend_s[confirm])),
                       f"{prefix}overhead_p50_ms": percentile(overhead_ms[confirm], 50),
                       f"{prefix}overhead_p99_ms": percentile(overhead_ms[confirm], 99)})
    if raw_s:
        result["raw_gbps"] = gbps(nbytes, statistics.median(raw_s))
    if hetero_s:
        result["hetero_gbps"] = gbps(hetero_bytes, statistics.median(hetero_s))
        result["hetero_backend_gbps"] = gbps(hetero_bytes, statistics.median(hetero_backend_s))
        result["hetero_ranges"] = hetero_ranges
        result["hetero_of_homogeneous"] = result["hetero_gbps"] / result["connector_gbps"]
    return result


CONFIRMATIONS = {"claim_in_read": "the same with the transfer claimed alongside the copy, not before",
                 "bus": "the same with the lease confirmed over the bus after the read (as before the table)"}
LIMIT_NAMES = {"copy": "torch copy_ of one contiguous buffer", "memmove": "ctypes.memmove of the request's ranges",
               "copy_waited": "the same copy_ launched and waited for from Python (host timer)"}


def report(result: dict) -> str:
    setup = result["setup"]
    lines = [f"request: {setup['tokens']} tokens, {setup['blocks']} blocks x {setup['block_bytes'] // 1024} KiB = "
             f"{setup['bytes'] / 2**20:.0f} MiB in {setup['ranges']} merged ranges; {setup['shards']} shard(s); "
             f"{setup['device']}; medians over {setup['repeats']} interleaved repeats"]
    for name, rate in result["limit_gbps"].items():
        mark = "  <- the limit" if name == result["limit"] else ""
        lines.append(f"limit, {LIMIT_NAMES[name]} in one process: {rate:8.2f} GB/s{mark}")
    limit = result["limit_gbps"][result["limit"]]
    lines.append(f"planning (token_ranges of the request): p50 {result['planning_us']['warm']:.1f} us back to back, "
                 f"{result['planning_us']['after_copy']:.1f} us right after a copy")
    for transport, r in result["transports"].items():
        lines.append(f"{transport:>6} connector read_blocks: {r['connector_gbps']:8.2f} GB/s = "
                     f"{r['of_limit']:.3f} x limit (goal >= {GOAL:.2f}); overhead over {setup['requests']} "
                     f"requests p50 {r['overhead_p50_ms']:.3f} ms, p99 {r['overhead_p99_ms']:.3f} ms")
        lines.append(f"{transport:>6}   of which the backend's read alone: {r['backend_gbps']:8.2f} GB/s = "
                     f"{r['backend_gbps'] / limit:.3f} x limit")
        for name, rate in result["limit_gbps"].items():
            if name != result["limit"]:
                lines.append(f"{transport:>6}   against the {name} limit: connector {r['connector_gbps'] / rate:.3f} x, "
                             f"the backend's read {r['backend_gbps'] / rate:.3f} x")
        for confirm, name in CONFIRMATIONS.items():
            if f"{confirm}_connector_gbps" in r:
                lines.append(f"{transport:>6}   {name}: {r[f'{confirm}_connector_gbps']:8.2f} GB/s = "
                             f"{r[f'{confirm}_connector_gbps'] / limit:.3f} x limit; overhead p50 "
                             f"{r[f'{confirm}_overhead_p50_ms']:.3f} ms, p99 {r[f'{confirm}_overhead_p99_ms']:.3f} ms")
        if "hetero_gbps" in r:
            lines.append(f"{transport:>6} decode of TP {setup['decode_tp']}, {setup['decode_block_size']}-token blocks "
                         f"(prefill TP {setup['tp']}, {setup['block_size']}): {r['hetero_gbps']:8.2f} GB/s in "
                         f"{r['hetero_ranges']} ranges = {r['hetero_of_homogeneous']:.3f} x a homogeneous read "
                         f"(goal >= {HETERO_GOAL:.2f}); the backend's read alone {r['hetero_backend_gbps']:.2f} GB/s")
        if "raw_gbps" in r:
            lines.append(f"{transport:>6} raw Mooncake transfer_sync_read (1 contiguous range): {r['raw_gbps']:8.2f} "
                         f"GB/s; connector / raw {r['connector_gbps'] / r['raw_gbps']:.2f}")
    return "\n".join(lines)


def geometry(args: argparse.Namespace) -> dict:
    keys = ("tokens", "layers", "kv_heads", "head_dim", "block_size", "num_blocks", "run_blocks", "shards", "tp")
    return {k: getattr(args, k) for k in keys}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    p.add_argument("--role", choices=("decode", "prefill", "decode-rank"), default="decode")
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--transport", choices=("tcp", "shm", "nvlink", "all"), default="all",
                   help="the connector's transport; all: tcp and shm on CPU, nvlink and tcp on CUDA (default)")
    p.add_argument("--device", default="cpu", help="where both KV caches live: cpu or cuda[:N] (default cpu)")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--decode-block-size", type=int, default=0,
                   help="also read with a decode engine of this block size (0: none, the default)")
    p.add_argument("--tp", type=int, default=1, help="TP size of the prefill and of the homogeneous decode")
    p.add_argument("--decode-tp", type=int, default=0,
                   help="also read with a decode instance of this TP size (0: none, the default)")
    p.add_argument("--num-blocks", type=int, default=256, help="KV cache size of each engine, in blocks")
    p.add_argument("--run-blocks", type=int, default=8, help="consecutive blocks per run in the block lists")
    p.add_argument("--repeats", type=int, default=10, help="interleaved runs of each path for the GB/s medians")
    p.add_argument("--requests", type=int, default=200, help="requests for the overhead percentiles")
    p.add_argument("--shards", type=int, default=0, help="--kv-read-shards of the connector (0: the transport's own)")
    p.add_argument("--transfers", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if ceil_div(args.tokens, min(args.block_size, args.decode_block_size or args.block_size)) > args.num_blocks:
        p.error("--num-blocks is too small for --tokens")
    if args.role != "decode" and args.transport == "all":
        p.error("a child serves one transport")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.role != "decode":
        new_event_loop().run_until_complete(serve_prefill(args) if args.role == "prefill" else serve_decode_rank(args))
        return
    run_bench(args, run_decode, report)


if __name__ == "__main__":
    main()
