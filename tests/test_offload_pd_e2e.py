"""P/D with real processes (registry, prefill, two decodes of 12 KV blocks, demo model on CPU, Mooncake
TCP on loopback): a decode with ``--kv-offload-cpu-gib`` takes the blocks of an evicted prompt from its
host tier and reads only the rest from prefill (same tokens); a decode without it reads them all."""

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
        procs.start_engine("prefill", "prefill")
        procs.start_engine("decode-offload", "decode", "--kv-offload-cpu-gib", "0.01", num_kv_blocks=12)
        procs.start_engine("decode", "decode", num_kv_blocks=12)
        await procs.wait_registered("prefill", "decode-offload", "decode")
        d = EngineDriver(procs.engine_endpoints())
        try:
            yield d
        finally:
            await d.close()


@pytest.mark.parametrize("decode, cached", [("decode", 0), ("decode-offload", 64)])
async def test_decode_reads_from_prefill_only_what_its_host_tier_lacks(driver, decode, cached):
    ids = prompt_ids(72, seed=len(decode))  # 4 full blocks and 8 tokens
    pre, dec = await driver.pd(f"a-{decode}", ids, decode=decode)
    first_bytes = dec[0].timings["kv_bytes"]
    for i in range(3):  # 100 tokens each: A's blocks leave the decode's 12-block cache
        await driver.pd(f"evict-{decode}-{i}", prompt_ids(100, seed=100 + i), decode=decode)
    pre2, dec2 = await driver.pd(f"a-again-{decode}", ids, decode=decode)
    assert tokens(pre2 + dec2) == tokens(pre + dec)
    assert dec2[-1].usage.cached_tokens == cached
    assert "kv_failed" not in dec2[0].timings
    read = dec2[0].timings["kv_bytes"]  # from prefill
    if cached:
        assert dec2[0].timings["kv_host_blocks"] == 4 and 0 < read < first_bytes  # only the last 8 tokens
    else:
        assert "kv_host_blocks" not in dec2[0].timings and read == first_bytes
    await driver.wait_idle("prefill", decode)
