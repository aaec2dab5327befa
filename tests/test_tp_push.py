"""Push mode between tensor-parallel instances, end to end with real processes (gloo on CPU): a TP 2 prefill's
two ranks each write their KV head, chunk by chunk, into a TP 1 decode (Mooncake TCP) and into a TP 2 decode
(rank to rank over shared memory); greedy output token-identical to a colocated TP 1 engine.
"""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from bench.engine_driver import EngineDriver, prompt_ids, tokens
from bench.processes import Processes

pytestmark = pytest.mark.asyncio(loop_scope="module")

FLAGS = ("--kv-mode", "push", "--kv-handshake-timeout-s", "10", "--kv-rpc-timeout-s", "10",
         "--max-num-batched-tokens", "64", "--tensor-parallel-timeout-s", "10")  # fmt: skip
LENGTHS = [1, 17, 100, 300]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def driver():
    async with Processes() as procs:
        procs.start_registry()
        procs.start_engine("p2", "prefill", *FLAGS, "-tp", "2", kv_transport="shm,tcp")
        procs.start_engine("d1", "decode", *FLAGS)
        procs.start_engine("d2", "decode", *FLAGS, "-tp", "2", kv_transport="shm,tcp")
        procs.start_engine("both", "prefill", "--role", "both")
        await procs.wait_registered("p2", "d1", "d2", "both", timeout_s=240)
        d = EngineDriver(procs.engine_endpoints(), timeout_s=120.0)
        try:
            yield d
        finally:
            await d.close()


@pytest.mark.parametrize(("decode", "transport"), [("d1", "tcp"), ("d2", "shm")])
async def test_push_across_tp_sizes_identical_to_colocated(driver, decode: str, transport: str):
    prompts = [prompt_ids(length, seed=3000 + len(decode) * 100 + length) for length in LENGTHS]
    refs = await asyncio.gather(*(driver.reference(ids) for ids in prompts))
    results = await asyncio.gather(*(driver.push_pd(f"tp-push-{decode}-{len(ids)}", ids, prefill="p2", decode=decode)
                                     for ids in prompts))  # concurrent requests
    for ids, ref, (pre, dec) in zip(prompts, refs, results):
        assert tokens(pre + dec) == ref, f"prompt of {len(ids)} tokens, p2 -> {decode}"
        assert pre[-1].timings["kv_bytes"] > 0
    assert (await driver.stats("p2")).kv_transports[decode] == transport
    await driver.wait_idle("p2", decode)
