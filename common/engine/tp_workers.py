"""Ranks 1..N-1 of a tensor-parallel engine instance: rank 0 starts, watches and stops them.

A worker (``python -m common.engine.tp_workers``) reads its ``WorkerSpec`` as one JSON line on
stdin, joins the group, loads its shard, sizes its KV cache with the others (the smallest
count wins), then runs the forward of every step rank 0 broadcasts until told to stop.
A worker of a P/D instance also registers its KV cache with its own transports and runs
a KV agent for rank 0 (``common.kv_transfer.rank_agent``), published in the rendezvous
store (``WorkerRanks.published``).
It exits as soon as rank 0 dies: its stdin (a pipe only rank 0 writes) reaches EOF.

Rank 0 watches every worker's process: one that exits unasked sets ``failure`` and calls
``on_exit`` (the async engine wakes up and fails its requests with ``TensorParallelError``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import msgspec
import torch
import torch.distributed as dist

from common.config import require
from common.engine.config import EngineConfig
from common.engine.kernels.backend import resolve_attention_backend, resolve_decode_gemv
from common.engine.kv_cache import Allocate, KVCache, num_kv_blocks, zeros
from common.engine.loader import load_model, parse_dtype
from common.engine.model import CausalLM
from common.engine.model_config import ModelConfig, load_model_config
from common.engine.model_runner import ModelRunner, StepInputs
from common.engine.parallel import (
    SINGLE,
    START_WAIT,
    TensorParallel,
    TensorParallelError,
    check_tensor_parallel,
)
from common.kv_offload.host_copier import HostCopier
from common.kv_offload.tier import host_slots
from common.kv_transfer.config import KVTransferConfig
from common.kv_transfer.rank_agent import open_rank_agent
from common.kv_transfer.ranges import KVLayout
from common.kv_transfer.transport_set import shared_kv_file

logger = logging.getLogger(__name__)

T = TypeVar("T")

STOP_TIMEOUT_S = 10.0  # a worker told to stop is killed after this long
CONNECT_POLL_S = 0.05  # rank 0 checks this often whether the workers reached the rendezvous


class WorkerSpec(msgspec.Struct, frozen=True):
    """What rank ``rank`` needs to join and load: the engine config's fields plus rank 0's resolutions."""

    rank: int
    world_size: int
    store_port: int  # of rank 0's rendezvous store on 127.0.0.1
    model_path: str
    dtype: str
    device: str  # this rank's device
    engine_config: dict
    kv_transfer: dict | None = None  # a P/D instance's KVTransferConfig fields: serve this rank's KV


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank ``rank``'s device: the CPU for every rank, else the ``rank``-th GPU from rank 0's."""
    return device if device.type == "cpu" else torch.device(device.type, (device.index or 0) + rank)


def _worker_env() -> dict[str, str]:
    """This environment, with this process's copy of pdserve first on the path (workers run the same code)."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root if not path else f"{root}{os.pathsep}{path}"}


class WorkerRanks:
    """Rank 0's handle on its worker processes."""

    def __init__(self, processes: list[subprocess.Popen], store: dist.Store | None = None):
        self.processes = processes
        self.store = store  # the rendezvous store, where workers publish what rank 0 collects
        self.failure: TensorParallelError | None = None
        self.on_exit: Callable[[], None] | None = None
        self._closing = False
        for rank, process in enumerate(processes, start=1):
            threading.Thread(target=self._watch, args=(rank, process), name=f"tp-rank-{rank}", daemon=True).start()

    @classmethod
    def launch(
        cls, config: EngineConfig, model_config: ModelConfig, path: Path, dtype: str, device: torch.device,
        kv_transfer: dict | None = None,
    ) -> tuple["WorkerRanks", TensorParallel]:
        """Start ranks 1..N-1 and join them as rank 0: (their handle, rank 0's ``TensorParallel``).
        With ``kv_transfer`` (KV transfer config fields) every worker serves its KV (``WorkerSpec``).
        Raises ``ConfigError`` for a TP size the model or the machine cannot take."""
        size = config.tensor_parallel_size
        check_tensor_parallel(model_config, size)
        if device.type == "cuda":
            first = device.index or 0
            require(first + size <= torch.cuda.device_count(), "tensor_parallel_size",
                    f"{size} ranks from {device} need GPUs up to cuda:{first + size - 1}")  # fmt: skip
        timeout_s = config.tensor_parallel_timeout_s
        if device.type == "cuda":
            torch.cuda.set_device(device.index or 0)
        store = TensorParallel.rendezvous(0, size, 0, timeout_s)
        fields = {name: getattr(config, name) for name in EngineConfig.__dataclass_fields__}
        workers = cls.start([
            WorkerSpec(rank, size, store.port, str(path), dtype, str(rank_device(device, rank)), fields, kv_transfer)
            for rank in range(1, size)
        ], store)  # fmt: skip
        try:
            # Starting a Python process that imports torch takes seconds, far longer on a busy host than a
            # step may: the rendezvous waits START_WAIT at least (a worker that exits fails it at once).
            workers.wait_for([_connected_key(rank) for rank in range(1, size)],
                             max(timeout_s, START_WAIT.total_seconds()))
            return workers, TensorParallel.join(0, size, store, device, timeout_s)
        except BaseException:
            workers.close(SINGLE)
            raise

    @classmethod
    def start(cls, specs: list[WorkerSpec], store: dist.Store | None = None) -> "WorkerRanks":
        """Start one worker per spec (each gets its spec on stdin and keeps the pipe open)."""
        processes = []
        for spec in specs:
            process = subprocess.Popen(
                [sys.executable, "-m", "common.engine.tp_workers"], stdin=subprocess.PIPE, env=_worker_env()
            )
            process.stdin.write(msgspec.json.encode(spec) + b"\n")
            process.stdin.flush()
            processes.append(process)
        return cls(processes, store)

    def wait_for(self, keys: list[str], timeout_s: float) -> None:
        """Wait until every key is in the store; ``TensorParallelError`` as soon as a worker exits
        first, or after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self.store.check(keys):
            self.check()
            if time.monotonic() > deadline:
                raise TensorParallelError(f"the tensor-parallel workers did not all publish {keys} "
                                          f"within {timeout_s:g}s")
            time.sleep(CONNECT_POLL_S)

    def published(self, name: str) -> list[bytes]:
        """What each worker rank, in rank order, published as ``name`` (``publish``), waiting up to
        ``START_WAIT`` for it (a worker that exits meanwhile fails it at once)."""
        keys = [_published_key(name, rank) for rank in range(1, len(self.processes) + 1)]
        self.wait_for(keys, START_WAIT.total_seconds())
        return [self.store.get(key) for key in keys]

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def check(self) -> None:
        """Raise ``TensorParallelError`` if a worker exited (or a collective failed)."""
        if self.failure is not None:
            raise self.failure

    def call(self, fn: Callable[[], T]) -> T:
        """``fn()``, a step or collective across the ranks: any failure there is a ``TensorParallelError``
        (and breaks the group for good)."""
        self.check()
        try:
            return fn()
        except RuntimeError as e:
            self.check()
            self.fail(TensorParallelError(f"tensor-parallel collective failed: {e}"))
            raise self.failure from e

    def fail(self, failure: TensorParallelError) -> None:
        """Record that the group is broken (a collective failed): ``close`` then kills the workers at once."""
        if self.failure is None:
            self.failure = failure

    def close(self, tp: TensorParallel) -> None:
        """Healthy: tell the workers to stop and wait up to ``STOP_TIMEOUT_S`` (then kill); after a
        failure: kill them.  Then leave the group."""
        if self._closing:
            return
        self._closing = True
        if self.failure is None and tp.world_size > 1:
            try:
                tp.send_stop()
            except RuntimeError as e:  # a worker is gone: the others see rank 0's pipe close below
                logger.warning("tensor parallel: stopping the workers: %s", e)
        for process in self.processes:
            process.stdin.close()
            if self.failure is not None:
                process.kill()
        for process in self.processes:
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning("tensor-parallel worker %d did not stop in %.0fs: killed", process.pid, STOP_TIMEOUT_S)
                process.kill()
                process.wait()
        tp.leave()

    def _watch(self, rank: int, process: subprocess.Popen) -> None:
        code = process.wait()
        if self._closing:
            return
        failure = TensorParallelError(f"tensor-parallel rank {rank} (pid {process.pid}) exited with code {code}")
        logger.error("%s", failure)
        self.fail(failure)
        if self.on_exit is not None:
            self.on_exit()


def load_rank(
    config: EngineConfig, model_config: ModelConfig, path: Path, dtype: torch.dtype, device: torch.device,
    max_model_len: int, tp: TensorParallel, attention_backend: str, kv_allocate: Allocate = zeros,
) -> tuple[CausalLM, KVCache]:
    """This rank's model (its shard; ``attention_backend`` resolved: torch or triton; ``--decode-gemv``
    resolved here) and KV cache (its KV heads; the block count every rank can hold)."""
    gemvs = resolve_decode_gemv(config.decode_gemv, attention_backend, device)
    model = load_model(path, model_config, dtype, device, tp, attention_backend, gemvs)
    num_kv_heads = tp.kv_heads(model_config.num_kv_heads)[1]
    num_blocks = num_kv_blocks(config, model_config, num_kv_heads, dtype, device, max_model_len)
    if tp.world_size > 1:
        num_blocks = tp.agree_min(num_blocks)
    mc = model_config
    kv_cache = KVCache(num_blocks, mc.num_layers, config.block_size, num_kv_heads, mc.head_dim, dtype, device,
                       kv_allocate)  # fmt: skip
    return model, kv_cache


def _connected_key(rank: int) -> str:
    return f"pdserve-tp-connected-{rank}"


def _published_key(name: str, rank: int) -> str:
    return f"pdserve-tp-{name}-{rank}"


def publish(store: dist.Store, name: str, rank: int, value: bytes) -> None:
    """Worker ``rank``: hand ``value`` to rank 0 (``WorkerRanks.published(name)``)."""
    store.set(_published_key(name, rank), value)


_at_exit: list[Callable[[], None]] = []  # what a worker undoes before it exits with rank 0 (shared-memory files)


def _exit_with_rank_zero() -> None:
    """Block until rank 0 closes our stdin (it stopped us, or it died), then exit at once."""
    sys.stdin.buffer.read()
    for undo in _at_exit:
        undo()
    os._exit(0)


def serve_rank(spec: WorkerSpec) -> None:
    """Join, load this rank's shard, then run every step rank 0 broadcasts until it says stop."""
    config = EngineConfig(**spec.engine_config)
    device = torch.device(spec.device)
    timeout_s = config.tensor_parallel_timeout_s
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = TensorParallel.rendezvous(spec.rank, spec.world_size, spec.store_port, timeout_s)
    store.set(_connected_key(spec.rank), "1")
    tp = TensorParallel.join(spec.rank, spec.world_size, store, device, timeout_s)
    model_config = load_model_config(spec.model_path)
    max_model_len = config.max_model_len or model_config.max_model_len
    kv_config = KVTransferConfig(**spec.kv_transfer) if spec.kv_transfer is not None else None
    kv_file = shared_kv_file(kv_config, device) if kv_config is not None else None
    if kv_file is not None:
        _at_exit.append(kv_file.close)
    backend = resolve_attention_backend(config.attention_backend, device)
    allocate = kv_file.allocate if kv_file is not None else zeros
    model, kv_cache = load_rank(config, model_config, Path(spec.model_path), parse_dtype(spec.dtype), device,
                                max_model_len, tp, backend, allocate)  # fmt: skip
    agent = None
    if kv_config is not None:
        heads = tp.kv_heads(model_config.num_kv_heads)
        agent, info = open_rank_agent(kv_config, spec.rank, heads, kv_cache.data, KVLayout.of(kv_cache),
                                      spec.world_size)
        publish(store, "kv", spec.rank, msgspec.msgpack.encode(info))
    slots = host_slots(config, model_config, parse_dtype(spec.dtype))
    runner = ModelRunner(model, kv_cache, device, config.max_num_seqs, max_model_len, enforce_eager=True, tp=tp,
                         offload=HostCopier(kv_cache, slots) if slots else None)
    try:
        while (message := tp.receive()) is not None:
            runner.forward(StepInputs.unpack(message))
    finally:
        if agent is not None:
            agent.close()
        if kv_file is not None:
            kv_file.close()
    tp.leave()


def main() -> None:
    spec = msgspec.json.decode(sys.stdin.buffer.readline(), type=WorkerSpec)
    threading.Thread(target=_exit_with_rank_zero, name="rank-zero-watch", daemon=True).start()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank-{spec.rank} %(levelname)s %(message)s")
    if spec.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.world_size))
    try:
        serve_rank(spec)
    except Exception:
        logger.exception("tensor-parallel rank %d failed", spec.rank)
        sys.exit(1)


if __name__ == "__main__":
    main()
