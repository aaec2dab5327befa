"""A tensor-parallel instance whose ranks die or hang fails its requests and stops; ranks never outlive rank 0."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.engine.async_engine import AsyncEngine, EngineDead
from common.engine.config import EngineConfig
from common.engine.engine import LLMEngine
from common.engine.parallel import TensorParallelError
from common.messages import SamplingParams
from tests.procs import REPO, eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

TIMEOUT_S = 3.0  # --tensor-parallel-timeout-s of these engines
LONG = SamplingParams(max_tokens=3000, temperature=0.0, ignore_eos=True)


def gone(pid: int) -> bool:
    """The process exited (a zombie nobody reaped counts as exited)."""
    status = Path(f"/proc/{pid}/status")
    try:
        return "State:\tZ" in status.read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone before, or while, we read it
        return True


def tp2_engine() -> LLMEngine:
    return LLMEngine(EngineConfig(model="demo", dtype="float32", device="cpu", num_kv_blocks=200,
                                  tensor_parallel_size=2, tensor_parallel_timeout_s=TIMEOUT_S))  # fmt: skip


async def fail_while_generating(stop_worker) -> tuple[AsyncEngine, list[int], float]:
    """Start a long request, ``stop_worker(pid)`` once it streams, and wait for its final output:
    (the async engine, the worker pids, seconds from the signal to the request's failure)."""
    core = tp2_engine()
    engine = AsyncEngine(core)
    stream = engine.generate("long", [5, 6, 7, 8], LONG)
    first = await anext(stream)
    assert first.new_token_ids and not first.finished
    stop_worker(core.workers.pids[0])
    start = time.monotonic()
    final = None
    async with asyncio.timeout(TIMEOUT_S + 30):
        async for out in stream:
            final = out
    elapsed = time.monotonic() - start
    assert final is not None and final.finish_reason == "error", final
    assert "TensorParallelError" in final.error
    assert isinstance(engine.failed, TensorParallelError)
    return engine, core.workers.pids, elapsed


async def test_killed_rank_fails_in_flight_requests_and_stops_the_instance():
    engine, pids, elapsed = await fail_while_generating(lambda pid: os.kill(pid, signal.SIGKILL))
    assert elapsed < TIMEOUT_S + 10
    await eventually(lambda: all(map(gone, pids)), timeout=30)
    with pytest.raises(EngineDead, match="tensor-parallel"):
        await engine.abort("long")


async def test_hung_rank_fails_the_step_within_the_timeout():
    engine, pids, elapsed = await fail_while_generating(lambda pid: os.kill(pid, signal.SIGSTOP))
    assert elapsed < TIMEOUT_S + 10
    assert "collective failed" in str(engine.failed)
    await eventually(lambda: all(map(gone, pids)), timeout=30)  # killed, stopped or not


async def test_idle_instance_learns_of_a_dead_rank():
    core = tp2_engine()
    engine = AsyncEngine(core)
    os.kill(core.workers.pids[0], signal.SIGKILL)
    await eventually(lambda: isinstance(engine.failed, TensorParallelError), timeout=30)
    assert "exited" in str(engine.failed)


async def test_a_rank_failing_at_start_fails_the_engine_fast(monkeypatch):
    from common.engine import tp_workers

    monkeypatch.setattr(tp_workers, "rank_device", lambda device, rank: torch.device("cuda", 7))  # no such GPU
    config = EngineConfig(model="demo", device="cpu", num_kv_blocks=16, tensor_parallel_size=2,
                          tensor_parallel_timeout_s=600)  # fmt: skip
    start = time.monotonic()
    with pytest.raises(TensorParallelError, match="exited with code"):
        LLMEngine(config)
    assert time.monotonic() - start < 120


async def test_ranks_exit_when_rank_zero_dies():
    script = (
        "from common.engine.config import EngineConfig\n"
        "from common.engine.engine import LLMEngine\n"
        "e = LLMEngine(EngineConfig(model='demo', device='cpu', num_kv_blocks=16, tensor_parallel_size=2))\n"
        "print(*e.workers.pids, flush=True)\n"
        "import time; time.sleep(600)\n"
    )
    rank0 = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    try:
        line = await asyncio.wait_for(asyncio.to_thread(rank0.stdout.readline), 120)
        worker_pids = [int(pid) for pid in line.split()]
        assert worker_pids and not any(map(gone, worker_pids))
    finally:
        rank0.kill()
        rank0.wait()
    await eventually(lambda: all(map(gone, worker_pids)), timeout=30)
