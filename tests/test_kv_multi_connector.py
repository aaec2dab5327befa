"""The multi-connector over its real children: the host tier of a real engine (``OffloadConnector``)
and the P/D reader (``PDConnector``) reading from a real prefill side channel (fake MoRI-IO fabric).
vLLM's four MultiConnector cases: capability, load first-wins, store to all, metadata aggregation."""

import random
from dataclasses import dataclass

import msgspec
import pytest
import torch

from common.engine.async_engine import AsyncEngine
from common.engine.block_manager import hash_block
from common.engine.engine import LLMEngine
from common.engine.kv_cache import KVCache
from common.engine.sequence import InvalidRequest, RemoteRequest
from common.kv_offload.connector import BlockLoad
from common.kv_offload.multi_connector import MultiConnector
from common.kv_offload.offload_connector import OffloadConnector
from common.kv_offload.pd_connector import PDConnector
from common.kv_transfer.reader import KVReader
from common.messages import SamplingParams
from tests.procs import eventually
from tests.test_kv_connector import Prefill, config, fake, fingerprint, open_rank, serving_prefill  # noqa: F401
from tests.test_kv_offload import GREEDY, evict_after, small_engine

DEMO = dict(num_layers=4, block_size=16, num_kv_heads=4, head_dim=32)  # the demo model's KV geometry


@dataclass
class Stack:
    core: LLMEngine
    engine: AsyncEngine
    prefill: Prefill
    reader: KVReader
    offload: OffloadConnector
    pd: PDConnector
    prompt: list[int]  # 72 tokens: its 4 full blocks are in the host tier, none in device memory

    def load(self, request_id: str, block_ids: list[int], prefill_blocks: list[int], num_tokens: int) -> BlockLoad:
        params = msgspec.structs.replace(self.prefill.params(prefill_blocks, request_id), num_tokens=num_tokens)
        return BlockLoad(request_id, block_ids, params)

    async def drain(self, request_id: str, ok: bool = True) -> None:
        self.engine.finish_remote_kv(request_id, ok)
        async for _ in self.engine.stream(request_id):
            pass


@pytest.fixture
async def stack(fake):  # noqa: F811
    core = small_engine(0.01)
    rng = random.Random(3)
    prompt = [rng.randrange(300) for _ in range(72)]
    evict_after(core, prompt, rng)
    while core.has_work():  # every copy to host finished
        core.step()
    engine = AsyncEngine(core)
    fp = fingerprint(dtype="float32", **DEMO)
    async with serving_prefill(KVCache(16, **DEMO, dtype=torch.float32, device="cpu"), fp) as prefill:
        rank = open_rank(config(), core.kv_cache)
        reader = KVReader([rank], "decode-0", fp, config(), rank.transports.chosen)
        try:
            yield Stack(core, engine, prefill, reader, OffloadConnector(engine), PDConnector(reader), prompt)
        finally:
            await reader.close()
            rank.close()
            await engine.shutdown()


def host_copy(stack: Stack, prompt: list[int], i: int) -> torch.Tensor:
    """The host tier's copy of the prompt's block ``i``."""
    h = 0
    for j in range(i + 1):
        h = hash_block(tuple(prompt[j * 16 : (j + 1) * 16]), h)
    slot = stack.core.offload.pool.entries[h][0]
    return stack.core.runner.offload.host[slot]


async def test_a_capability_is_supported_when_any_connector_has_it(stack):
    multi = MultiConnector([stack.offload, stack.pd])
    assert not stack.offload.supports("remote_prefill") and not stack.pd.supports("host_tier")
    assert multi.supports("remote_prefill") and multi.supports("host_tier") and multi.supports("heterogeneous_block_size")
    assert not multi.supports("push")


async def test_each_block_loads_from_the_first_connector_that_has_it(stack):
    allocation = await stack.engine.add_remote(RemoteRequest("r1", stack.prompt, 1, GREEDY, 72))
    assert allocation.num_cached_blocks == 0  # evicted from device memory
    ours = allocation.block_ids[:5]
    load = stack.load("r1", ours, [3, 4, 5, 6, 7], 72)
    stats = await MultiConnector([stack.offload, stack.pd]).load(load, 0)
    assert stats.num_blocks == 5
    assert stack.offload.metadata()["loaded_blocks"] == 4 and stack.pd.metadata()["read_blocks"] == 1
    kv = stack.core.kv_cache.data
    assert torch.equal(kv[ours[4]][:, :8], stack.prefill.kv.data[7][:, :8])  # the partial block, from prefill
    await stack.drain("r1")  # the host tier's copies land before the request's first step
    for i in range(4):
        assert torch.equal(kv[ours[i]], host_copy(stack, stack.prompt, i))
        assert not torch.equal(kv[ours[i]], stack.prefill.kv.data[3 + i])  # never read from prefill too
    await stack.reader.releases.flush()
    assert await stack.prefill.unpinned() == [stack.prefill.transfer_ids["r1"]]


async def test_a_connector_placed_first_takes_every_block_it_has(stack):
    allocation = await stack.engine.add_remote(RemoteRequest("r1", stack.prompt, 1, GREEDY, 72))
    ours = allocation.block_ids[:5]
    stats = await MultiConnector([stack.pd, stack.offload]).load(stack.load("r1", ours, [3, 4, 5, 6, 7], 72), 0)
    assert stats.num_blocks == 5 and stack.pd.metadata()["read_blocks"] == 5
    assert stack.offload.metadata()["loaded_blocks"] == 0  # skipped: nothing left to load
    assert torch.equal(stack.core.kv_cache.data[ours[0]], stack.prefill.kv.data[3])
    await stack.drain("r1")


async def test_blocks_all_found_in_the_host_tier_are_not_read_but_prefill_is_released(stack):
    allocation = await stack.engine.add_remote(RemoteRequest("r1", stack.prompt[:64], 1, GREEDY, 64))
    load = stack.load("r1", allocation.block_ids[:4], [3, 4, 5, 6], 64)
    stats = await MultiConnector([stack.offload, stack.pd]).load(load, 0)
    assert stats.num_blocks == 4 and stack.pd.metadata() == {"read_blocks": 0, "read_bytes": 0, "skipped": 1,
                                                            "stores": 0}
    await stack.reader.releases.flush()
    assert await stack.prefill.unpinned() == [stack.prefill.transfer_ids["r1"]]
    await stack.drain("r1")


async def test_store_goes_to_every_connector(stack):
    prompt = [random.Random(4).randrange(300) for _ in range(40)]
    allocation = await stack.engine.add_remote(
        RemoteRequest("r2", prompt, 1, SamplingParams(max_tokens=140, temperature=0.0, ignore_eos=True), 40))
    multi = MultiConnector([stack.offload, stack.pd])
    load = stack.load("r2", allocation.block_ids[:3], [8, 9, 10], 40)
    assert (await multi.load(load, 0)).num_blocks == 3
    stack.engine.finish_remote_kv("r2", True)
    multi.store(load)
    core = stack.core

    first = hash_block(tuple(prompt[:16]), 0)
    pool = core.offload.pool

    def stored() -> bool:
        hashes = (first, hash_block(tuple(prompt[16:32]), first))
        return all(h in pool and pool.entries[h][0] not in pool.reserved for h in hashes)

    await eventually(stored)
    assert "r2" in core.requests  # stored while the request still runs, not when it freed its blocks
    assert torch.equal(host_copy(stack, prompt, 1), core.kv_cache.data[allocation.block_ids[1]])
    assert stack.pd.metadata()["stores"] == 1
    async for _ in stack.engine.stream("r2"):
        pass


async def test_metadata_of_every_connector_is_aggregated(stack):
    multi = MultiConnector([stack.offload, stack.pd])
    meta = multi.metadata()
    assert meta == {**{f"cpu_offload.{k}": v for k, v in stack.offload.metadata().items()},
                    **{f"pd.{k}": v for k, v in stack.pd.metadata().items()}}
    assert meta["cpu_offload.host_blocks"] > 0 and "pd.read_blocks" in meta


async def test_a_failed_load_skips_the_connectors_after_it_and_prefill_is_released(stack):
    allocation = await stack.engine.add_remote(RemoteRequest("r1", stack.prompt, 1, GREEDY, 72))
    load = stack.load("r1", allocation.block_ids[:5], [3, 4, 5, 6, 7], 72)
    with pytest.raises(InvalidRequest):  # the host tier continues the chain only where the local hits end
        await MultiConnector([stack.offload, stack.pd]).load(load, 1)
    assert stack.pd.metadata()["skipped"] == 1
    await stack.reader.releases.flush()
    assert await stack.prefill.unpinned() == [stack.prefill.transfer_ids["r1"]]
    await stack.engine.abort("r1")
