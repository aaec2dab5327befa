"""An engine service process with --tensor-parallel-size 2 (colocated): it serves what TP 1 computes,
fails its in-flight requests when a rank dies and exits (P/D instances: tests/test_tp_pd.py)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from bench.engine_driver import GREEDY, EngineDriver, prompt_ids
from bench.processes import Processes
from common.engine.config import EngineConfig
from common.engine.engine import LLMEngine
from common.errors import PeerError
from common.messages import Generate, SamplingParams

TIMEOUT_S = 5.0  # --tensor-parallel-timeout-s
LONG = SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)


def children(pid: int) -> list[int]:
    """Pids whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.asyncio
async def test_tp2_service_serves_tp1_tokens_and_exits_when_a_rank_dies():
    ids = prompt_ids(21, seed=3)
    reference = LLMEngine(EngineConfig(model="demo", dtype="float32", device="cpu", num_kv_blocks=256))
    expected = reference.generate([ids], GREEDY)[0].new_token_ids
    async with Processes() as procs:
        procs.start_registry()
        engine = procs.start_engine("tp2", "prefill", "--role", "both", "-tp", "2",
                                    "--tensor-parallel-timeout-s", str(TIMEOUT_S))  # fmt: skip
        await procs.wait_registered("tp2")
        driver = EngineDriver(procs.engine_endpoints())
        try:
            assert await driver.reference(ids, name="tp2") == expected
            (worker,) = children(engine.popen.pid)
            stream = driver.client("tp2").stream(Generate("long", LONG, prompt_token_ids=ids))
            first = await anext(stream)
            assert first.token_ids
            os.kill(worker, signal.SIGKILL)
            with pytest.raises(PeerError, match="TensorParallelError"):
                async with asyncio.timeout(TIMEOUT_S + 30):
                    async for _ in stream:
                        pass
            assert await procs.wait_exit("tp2", timeout_s=30) != 0
        finally:
            await driver.close()
