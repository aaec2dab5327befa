"""The fake engines run production parts: a real ``KVReader`` reads from a fake prefill over its
real side channel (``FakeTransport`` underneath), releases go through the real handoff, and
each role serves what the production role serves."""

from __future__ import annotations

import pytest
import pytest_asyncio

from bench.fakes import FakeEngine
from bench.fakes.prefill_kv import BLOCK_BYTES
from bench.fakes.transport import FakeTransport
from common.bus import BusClient
from common.errors import PeerError
from common.kv_transfer.config import KVTransferConfig
from common.kv_transfer.ranges import KVLayout
from common.kv_transfer.reader import KVReader
from common.messages import Generate, SamplingParams, TokenOutput
from services.registry.server import Registry, RegistryConfig
from tests.procs import eventually


@pytest_asyncio.fixture
async def start_engine():
    registry = Registry(RegistryConfig(bind="tcp://127.0.0.1:0"))
    await registry.start()
    engines: list[FakeEngine] = []
    clients: list[BusClient] = []

    async def start(role, **kwargs) -> tuple[FakeEngine, BusClient]:
        engine = FakeEngine(role, registry.endpoint, **kwargs)
        await engine.start()
        engines.append(engine)
        clients.append(BusClient(engine.server.endpoint, timeout=5.0))
        return engine, clients[-1]

    yield start
    for client in clients:
        await client.close()
    for engine in engines:
        await engine.stop()
    await registry.close()


async def run(client: BusClient, **fields) -> list[TokenOutput]:
    gen = Generate(request_id=fields.pop("request_id", "r1"), prompt="abcdefghij",
                   sampling=SamplingParams(max_tokens=fields.pop("max_tokens", 4)), **fields)
    return [out async for out in client.stream(gen)]


async def test_a_real_kv_reader_reads_from_a_fake_prefill_and_its_release_unpins(start_engine):
    prefill, client = await start_engine("prefill")
    [out] = await run(client, do_remote_decode=True)
    params = out.kv_transfer
    assert out.finish_reason == "remote_decode" and len(params.transfer_id) == 32
    assert prefill.load().kv_blocks_pinned == len(params.block_ids) == 3
    layout = KVLayout(0, BLOCK_BYTES, 16)
    rank = FakeTransport.serving("fake://reader", layout, prefill.fingerprint.num_kv_heads)
    reader_transport = rank.transports.backends["tcp"]
    reader = KVReader([rank], "d0", prefill.fingerprint, KVTransferConfig(kv_transport="tcp"), {})
    try:
        stats = await reader.read_blocks(params, [5, 6, 7])
        # the prompt's tokens only: two whole blocks, then the partial last block as a piece per KV head (2)
        assert params.num_tokens % prefill.fingerprint.block_size and prefill.fingerprint.num_kv_heads == 2
        token_bytes = BLOCK_BYTES // prefill.fingerprint.block_size
        assert (stats.num_blocks, stats.num_ranges, stats.bytes) == (3, 4, params.num_tokens * token_bytes)
        assert reader_transport.peers == {prefill.prefill_kv.transport.session}
        await eventually(lambda: prefill.load().kv_blocks_pinned == 0 and not prefill.prefill_kv.handoff)
    finally:
        await reader.close()
        rank.close()


async def test_lease_expiry_releases_through_the_handoff(start_engine):
    prefill, client = await start_engine("prefill", lease_s=0.5, lease_sweep_s=0.05)
    [out] = await run(client, do_remote_decode=True)
    assert out.kv_transfer is not None  # leased, so pinned: nobody reads or releases it
    await eventually(lambda: prefill.load().kv_blocks_used == 0 and not prefill.prefill_kv.handoff.leases)


@pytest.mark.parametrize("role", ["prefill", "decode", "both"])
async def test_every_role_serves_a_plain_request_colocated(start_engine, role):
    _, client = await start_engine(role)
    outs = await run(client, max_tokens=3)
    assert outs[-1].finish_reason == "length" and outs[-1].usage.completion_tokens == 3
    assert sum(len(o.token_ids) for o in outs) == 3 and all(o.kv_transfer is None for o in outs)


async def test_a_leg_goes_only_to_its_role(start_engine):
    _, both = await start_engine("both")
    with pytest.raises(PeerError) as err:
        await run(both, do_remote_decode=True)
    assert (err.value.code, err.value.param) == ("invalid_request", "do_remote_decode")


async def test_a_stop_string_is_cut_and_never_partly_sent(start_engine):
    _, client = await start_engine("both", tokens_per_output=1)
    full = "".join(o.text for o in await run(client, request_id="full", max_tokens=12))
    stop = full[5:7]
    gen = Generate(request_id="cut", prompt="abcdefghij", sampling=SamplingParams(max_tokens=12, stop=[stop]))
    outs = [out async for out in client.stream(gen)]
    assert outs[-1].finish_reason == "stop" and "".join(o.text for o in outs) == full[:full.index(stop)]
