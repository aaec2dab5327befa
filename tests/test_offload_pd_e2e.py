"""P/D with real processes (registry, prefill, two decodes of 12 KV blocks, demo model on CPU, Mooncake
TCP on loopback): a decode with ``--kv-offload-cpu-gib`` takes the blocks of an evicted prompt from its
host tier and reads only the rest from prefill (same tokens); a decode without it reads them all.
Through a gateway and the official ``openai`` client, ``usage.prompt_tokens_details.cached_tokens`` counts
the prompt tokens prefill did not compute, never the decode's host-tier hits (docs/architecture.md)."""

from __future__ import annotations

import httpx
import openai
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from bench.engine_driver import EngineDriver, prompt_ids, tokens
from bench.processes import Processes, free_port
from tests.procs import gateway_serving

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


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway():
    """A disaggregated stack whose prefill and decode both hold 12 KV blocks, only the decode with a host tier:
    the official client, and the gateway's URL."""
    async with Processes() as procs:
        procs.start_registry()
        procs.start_engine("prefill", "prefill", num_kv_blocks=12)
        procs.start_engine("decode", "decode", "--kv-offload-cpu-gib", "0.01", num_kv_blocks=12)
        port = free_port()
        procs.spawn("gateway", "services.gateway", ["--port", str(port), "--registry", procs.registry_endpoint,
                                                    "--mode", "disagg"])
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                    timeout=60)
        await procs.wait_registered("prefill", "decode")
        await gateway_serving(client)
        try:
            yield client, f"http://127.0.0.1:{port}"
        finally:
            await client.close()


async def kv_bytes_read(url: str) -> float:
    """The KV bytes decodes read from prefills so far (the gateway's ``pdserve_gateway_kv_transfer_bytes``)."""
    async with httpx.AsyncClient() as http:
        page = (await http.get(f"{url}/metrics")).text
    return next(s.value for family in text_string_to_metric_families(page) for s in family.samples
                if s.name == "pdserve_gateway_kv_transfer_bytes_sum")


async def test_cached_tokens_are_the_prefills_hits_not_the_decodes_host_tier(gateway):
    """vLLM's P/D rule: cached tokens are the prefill's prefix hits (device or its own host tier); a decode's
    hits only shorten the KV read and show in ``pdserve_gateway_kv_transfer_bytes``."""
    client, url = gateway
    ids = prompt_ids(72, seed=3)  # 4 full blocks and 8 tokens

    async def complete(prompt: list[int]):
        return await client.completions.create(model="demo", prompt=prompt, max_tokens=8, temperature=0,
                                               extra_body={"ignore_eos": True})

    before = await kv_bytes_read(url)
    first = await complete(ids)
    whole = await kv_bytes_read(url) - before
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert (await complete(ids)).usage.prompt_tokens_details.cached_tokens == 64  # prefill's device cache
    for i in range(3):  # 100 tokens each: A's blocks leave both 12-block caches, the decode keeps them in host memory
        await complete(prompt_ids(100, seed=100 + i))
    before = await kv_bytes_read(url)
    again = await complete(ids)
    assert again.choices[0].text == first.choices[0].text
    assert 0 < await kv_bytes_read(url) - before < whole  # decode read only the last 8 tokens
    assert again.usage.prompt_tokens_details.cached_tokens == 0  # prefill computed all 72
