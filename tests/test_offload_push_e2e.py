"""Push mode with a decode host tier, real processes (registry, prefill, a decode of 12 KV blocks with
``--kv-offload-cpu-gib``, demo model on CPU, Mooncake TCP on loopback): once a prompt's blocks were evicted from
the decode's device memory into its host tier, a second request for it loads them from there and prefill
writes only the rest (same tokens)."""

from __future__ import annotations

import pytest
import pytest_asyncio

from bench.engine_driver import EngineDriver, prompt_ids, tokens
from bench.processes import Processes

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def driver():
    async with Processes() as procs:
        procs.start_registry()
        procs.start_engine("prefill", "prefill", "--kv-mode", "push")
        procs.start_engine("decode", "decode", "--kv-mode", "push", "--kv-offload-cpu-gib", "0.01", num_kv_blocks=12)
        await procs.wait_registered("prefill", "decode")
        d = EngineDriver(procs.engine_endpoints())
        try:
            yield d
        finally:
            await d.close()


async def test_prefill_pushes_only_what_the_decodes_host_tier_lacks(driver):
    ids = prompt_ids(72, seed=5)  # 4 full blocks and 8 tokens
    pre, dec = await driver.push_pd("a", ids)
    first_bytes = pre[-1].timings["kv_bytes"]
    for i in range(3):  # 100 tokens each: A's blocks leave the decode's 12-block cache
        await driver.push_pd(f"evict-{i}", prompt_ids(100, seed=100 + i))
    pre2, dec2 = await driver.push_pd("a-again", ids)
    assert tokens(pre2 + dec2) == tokens(pre + dec)
    assert dec2[-1].usage.cached_tokens == 64 and dec2[0].timings["kv_host_blocks"] == 4
    assert 0 < pre2[-1].timings["kv_bytes"] == first_bytes * 8 // 72  # only the last 8 tokens
    await driver.wait_idle("prefill", "decode")
