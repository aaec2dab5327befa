"""The test plan's GPU layer (ATOM's L3) on real hardware: ``python -m pytest -m gpu tests/test_gpu_layer.py``.

Skipped without CUDA (CI); the GPU machine runs it (bench/kernels_gpu.sh, part ``gpu-tests``):

* KV memory registration: every transport's offer and the rank's registered region are non-null;
* a producer -> consumer loopback: a peer process fills a GPU KV cache from a seed and serves it; this
  process reads blocks of it over each GPU transport into its own GPU cache and compares byte for byte;
* end to end: a gateway, a prefill and a decode (KV over ``nvlink``), greedy completions through the
  official ``openai`` client equal to a colocated engine's, sequentially and 16 at once.

The peer is this module run as ``python -m tests.test_gpu_layer SEED TRANSPORT``.
"""

from __future__ import annotations

import asyncio
import sys

import msgspec
import pytest
import torch

from bench.engine_driver import prompt_ids
from bench.processes import Processes, free_port
from common.engine.kv_cache import KVCache
from common.kv_transfer.config import KVTransferConfig
from common.kv_transfer.rank_io import LocalRankIO
from common.kv_transfer.ranges import BlockPairs, BlockTable, ByteRanges, KVLayout, token_ranges, whole_blocks
from common.kv_transfer.status import TransferStatus
from common.messages import KVRankMemory
from tests.procs import PeerProcess, eventually

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GEOMETRY = dict(num_layers=4, block_size=16, num_kv_heads=4, head_dim=64, dtype=torch.bfloat16)
NUM_BLOCKS = 32
SEED = 77
GPU_TRANSPORTS = ("nvlink", "tcp")  # CUDA IPC, and Mooncake TCP staging GPU memory through the host


def seeded_cache(seed: int, device: str) -> KVCache:
    kv = KVCache(num_blocks=NUM_BLOCKS, device=device, **GEOMETRY)
    gen = torch.Generator().manual_seed(seed)
    kv.data.copy_(torch.randn(kv.data.shape, generator=gen, dtype=torch.float32).to(kv.data.dtype))
    torch.cuda.synchronize(device)
    return kv


def open_rank(transport: str, kv: KVCache) -> LocalRankIO:
    return LocalRankIO.open(KVTransferConfig(kv_transport=transport), 0, (0, kv.num_kv_heads), kv.data,
                            KVLayout.of(kv))


def serve_peer(seed: int, transport: str) -> None:
    """The producer: its KV (on GPU 0) registered over ``transport``, described on stdout, until stdin closes."""
    kv = seeded_cache(seed, "cuda:0")
    rank = open_rank(transport, kv)
    print(msgspec.json.encode(rank.memory).decode(), flush=True)
    sys.stdin.read()
    rank.close()


def consumer_device() -> str:
    """The other GPU when there are two (the read crosses NVLink), else the producer's."""
    return f"cuda:{min(1, torch.cuda.device_count() - 1)}"


@pytest.mark.parametrize("transport", GPU_TRANSPORTS)
def test_registration_metadata_is_not_null(transport):
    kv = KVCache(num_blocks=NUM_BLOCKS, device="cuda:0", **GEOMETRY)
    rank = open_rank(transport, kv)
    try:
        memory = rank.memory
        assert memory.region.addr == kv.data.data_ptr() != 0
        assert memory.region.length == NUM_BLOCKS * kv.block_bytes
        assert memory.memory == "cuda" and memory.host_id
        (offer,) = [o for o in memory.transports if o.name == transport]
        assert offer.session
        if transport == "nvlink":
            assert offer.meta  # the CUDA IPC handle a reader maps
    finally:
        rank.close()


@pytest.mark.parametrize("plan", ["ranges", "blocks"])
@pytest.mark.parametrize("transport", GPU_TRANSPORTS)
def test_producer_to_consumer_loopback_byte_for_byte(transport, plan):
    """Scattered blocks, the prompt ending inside the last, planned as byte ranges (``token_ranges``) or as
    whole blocks and a tail (``whole_blocks``: the reader's plan between engines of one block size)."""
    expected = seeded_cache(SEED, "cuda:0")
    local = KVCache(num_blocks=NUM_BLOCKS, device=consumer_device(), **GEOMETRY)
    rank = open_rank(transport, local)
    remote_ids, local_ids = [5, 6, 7, 20, 3], [0, 1, 2, 9, 31]
    num_tokens = 16 * len(local_ids) - 5
    try:
        with PeerProcess("tests.test_gpu_layer", str(SEED), transport) as info:
            peer = msgspec.convert(info, KVRankMemory)
            offer = next(o for o in peer.transports if o.name == transport)
            heads = range(GEOMETRY["num_kv_heads"])
            ours = BlockTable(KVLayout.of(local), 16, local_ids, 0, len(heads))
            theirs = BlockTable(KVLayout(peer.region.addr, peer.block_bytes, peer.num_blocks), 16, remote_ids, 0,
                                len(heads))
            ranges = token_ranges(ours, theirs, heads=heads, num_tokens=num_tokens)
            copy = ranges if plan == "ranges" else whole_blocks(ours, theirs, heads=heads, num_tokens=num_tokens)

            async def read():
                await rank.connect(transport, offer.session, offer.meta)
                return await rank.read(transport, offer.session, copy)

            statuses, _ = asyncio.run(read())
        assert statuses == [TransferStatus.SUCCESS] * copy.count
        torch.cuda.synchronize(local.data.device)
        reference = torch.zeros_like(local.data, device="cpu").view(-1).view(torch.uint8)
        source = expected.data.cpu().view(-1).view(torch.uint8)
        for la, ra, n in zip(*ranges):  # the prompt's bytes, and nothing else
            la, ra = la - local.data.data_ptr(), ra - peer.region.addr
            reference[la : la + n] = source[ra : ra + n]
        assert torch.equal(local.data.cpu().view(-1).view(torch.uint8), reference)
    finally:
        rank.close()


@pytest.mark.parametrize("transport", GPU_TRANSPORTS)
def test_push_write_into_the_peer_then_read_back_byte_for_byte(transport):
    """Push mode: our blocks written into the producer process's cache, then read back from there into
    other blocks of ours."""
    mine = seeded_cache(SEED + 1, consumer_device())
    rank = open_rank(transport, mine)
    local_ids, remote_ids, back_ids = [0, 1, 9], [12, 13, 30], [2, 3, 4]
    try:
        with PeerProcess("tests.test_gpu_layer", str(SEED), transport) as info:
            peer = msgspec.convert(info, KVRankMemory)
            offer = next(o for o in peer.transports if o.name == transport)
            heads = range(GEOMETRY["num_kv_heads"])

            def ranges(ours: list[int]):
                return token_ranges(
                    BlockTable(KVLayout.of(mine), 16, ours, 0, len(heads)),
                    BlockTable(KVLayout(peer.region.addr, peer.block_bytes, peer.num_blocks), 16, remote_ids, 0,
                               len(heads)),
                    heads=heads, num_tokens=16 * len(ours))

            async def write_then_read():
                await rank.connect(transport, offer.session, offer.meta)
                written, _ = await rank.write(transport, offer.session, ranges(local_ids))
                read, _ = await rank.read(transport, offer.session, ranges(back_ids))
                return written, read

            written, read = asyncio.run(write_then_read())
        assert set(written) == set(read) == {TransferStatus.SUCCESS}
        torch.cuda.synchronize(mine.data.device)
        for back, ours in zip(back_ids, local_ids):
            assert torch.equal(mine.data[back].view(torch.int16).cpu(), mine.data[ours].view(torch.int16).cpu())
    finally:
        rank.close()


@pytest.mark.parametrize("transport", GPU_TRANSPORTS)
def test_whole_blocks_reaching_outside_the_peer_fail_and_write_nothing_there(transport):
    """A block id past the peer's cache (as a corrupt transfer would name): that block's status is FAILED and its
    destination block stays untouched; the blocks inside are copied (the read as a whole fails on that status)."""
    local = KVCache(num_blocks=NUM_BLOCKS, device=consumer_device(), **GEOMETRY)
    rank = open_rank(transport, local)
    try:
        with PeerProcess("tests.test_gpu_layer", str(SEED), transport) as info:
            peer = msgspec.convert(info, KVRankMemory)
            offer = next(o for o in peer.transports if o.name == transport)
            blocks = BlockPairs(local.data.data_ptr(), peer.region.addr, peer.block_bytes, [1, 2, 3],
                                [4, peer.num_blocks, 5], ByteRanges([], [], []))

            async def read():
                await rank.connect(transport, offer.session, offer.meta)
                return await rank.read(transport, offer.session, blocks)

            statuses, _ = asyncio.run(read())
        assert statuses[1] is TransferStatus.FAILED and blocks.count == len(statuses) == 3
        torch.cuda.synchronize(local.data.device)
        assert not local.data[2].any()
    finally:
        rank.close()


async def test_gateway_prefill_decode_end_to_end_and_concurrent():
    openai = pytest.importorskip("openai")  # the GPU machine's image lacks it: carry its wheels
    flags = ("--device", "cuda", "--dtype", "float32")
    async with Processes() as procs:
        procs.start_registry()
        procs.start_engine("prefill", "prefill", *flags, kv_transport="nvlink")
        procs.start_engine("decode", "decode", *flags, kv_transport="nvlink")
        procs.start_engine("both", "prefill", "--role", "both", *flags)
        await procs.wait_registered("prefill", "decode", "both", timeout_s=240)
        port = free_port()
        procs.spawn("gateway", "services.gateway", ["--registry", procs.registry_endpoint, "--host", "127.0.0.1",
                                                    "--port", str(port), "--mode", "disagg"])
        colocated_port = free_port()
        procs.spawn("gateway-colocated", "services.gateway",
                    ["--registry", procs.registry_endpoint, "--host", "127.0.0.1", "--port", str(colocated_port),
                     "--mode", "colocated"])
        pd = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0, timeout=120)
        colocated = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{colocated_port}/v1", api_key="-",
                                       max_retries=0, timeout=120)

        async def ready(client) -> bool:
            try:
                return bool((await client.models.list()).data)
            except openai.OpenAIError:
                return False

        for client in (pd, colocated):
            await eventually(lambda c=client: ready(c), timeout=120)

        async def complete(client, ids):
            reply = await client.completions.create(model="demo", prompt=ids, max_tokens=16, temperature=0.0,
                                                    extra_body={"ignore_eos": True})
            return reply.choices[0].text

        prompts = [prompt_ids(n, seed=n) for n in (1, 17, 100, 300)] + [prompt_ids(40, seed=s) for s in range(12)]
        assert [await complete(pd, ids) for ids in prompts[:4]] == [await complete(colocated, ids)
                                                                     for ids in prompts[:4]]
        together = await asyncio.gather(*(complete(pd, ids) for ids in prompts))
        assert together == [await complete(colocated, ids) for ids in prompts]
        await pd.close()
        await colocated.close()
        procs.check_alive()


if __name__ == "__main__":
    serve_peer(int(sys.argv[1]), sys.argv[2])
