"""L2: push-mode TP-aware KV writes in one process: prefill ranks write into decode ranks' pre-allocated blocks,
each rank's KV cache a shared-memory file (the real shm backend), the prefill's worker ranks behind real
``RankAgent``s over ZMQ, decode's pre-allocation behind its real side channel (``PushedRequests``).

Every (prefill TP, decode TP, block sizes) combination must leave each decode rank holding exactly its heads of
every token, written in chunks as prefill computes them; nothing is written once decode let its blocks go.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from common.bus import BusServer
from common.client_pool import ClientPool
from common.errors import KVTransferError
from common.kv_transfer.leases import LeaseTable
from common.kv_transfer.rank_agent import RankAgent
from common.kv_transfer.rank_io import RankIO, RemoteRankIO
from common.kv_transfer.side_channel import KVSideChannel
from common.kv_transfer.writer import KVWriter
from common.messages import KVRequest, PushTarget
from services.decode.push import PushedRequests
from tests.test_tp_kv_reader import COMBINATIONS, CONFIG, check_copied, close_ranks, fingerprint, open_ranks

NUM_TOKENS = 27  # a partial last block on both sides
PREFILL_BLOCKS, DECODE_BLOCKS = [5, 2, 9, 11, 30, 0, 7], [3, 4, 12, 13, 20, 21, 1]


async def start(heads: int, p: int, d: int, prefill_bs: int, decode_bs: int):
    prefill = open_ranks(heads, prefill_bs, p)
    generator = torch.Generator().manual_seed(p * 100 + prefill_bs)
    for rank in prefill:
        rank.kv.data.copy_(torch.randn(rank.kv.data.shape, generator=generator))
    for a, b in zip(prefill, prefill[1:]):  # replicated heads hold the same values, as real ranks compute them
        if a.heads == b.heads:
            b.kv.data.copy_(a.kv.data)
    agents = [RankAgent(rank.io) for rank in prefill[1:]]
    clients = ClientPool(name="ranks", timeout=10.0)
    ios: list[RankIO] = [prefill[0].io, *(RemoteRankIO(a.io.memory, a.start(), clients, CONFIG) for a in agents)]
    writer = KVWriter(ios, "p0", fingerprint(heads, prefill_bs, p), CONFIG, {})
    decode = open_ranks(heads, decode_bs, d)
    pushed = PushedRequests(LeaseTable(30.0))
    server = BusServer("tcp://127.0.0.1:0", KVRequest, name="kv-d0")
    KVSideChannel("d0", fingerprint(heads, decode_bs, d), [r.io.memory for r in decode], "", pushed).attach(server)
    await server.start()

    async def stop() -> None:
        await writer.close()
        await clients.close()
        for agent in agents:
            agent.close()
        close_ranks(prefill[:1])
        for rank in prefill[1:]:
            rank.file.close()
        await server.close()
        close_ranks(decode)

    return SimpleNamespace(ranks=prefill, writer=writer), SimpleNamespace(ranks=decode, pushed=pushed,
                                                                          endpoint=server.endpoint), stop


def target(decode, request_id: str, block_ids: list[int], block_size: int, tp: int, cached: int = 0) -> PushTarget:
    transfer_id, expiry, _ = decode.pushed.open(request_id, block_ids)
    return PushTarget("d0", decode.endpoint, transfer_id, block_ids, NUM_TOKENS, cached, block_size, expiry,
                      tensor_parallel_size=tp)


@pytest.mark.parametrize(("heads", "p", "d"), COMBINATIONS)
@pytest.mark.parametrize(("prefill_bs", "decode_bs"), [(4, 4), (4, 8), (8, 4)])
async def test_every_decode_rank_gets_exactly_its_heads_chunk_by_chunk(heads, p, d, prefill_bs, decode_bs):
    prefill, decode, stop = await start(heads, p, d, prefill_bs, decode_bs)
    try:
        remote = PREFILL_BLOCKS[: -(-NUM_TOKENS // prefill_bs)]
        local = DECODE_BLOCKS[: -(-NUM_TOKENS // decode_bs)]
        push = target(decode, "r", local, decode_bs, d)
        written = 0
        for start_token, end in ((0, 10), (10, 11), (11, NUM_TOKENS)):  # chunks ending anywhere in a block
            written += (await prefill.writer.write(push, start_token, end, remote)).bytes
        check_copied(prefill, decode, remote, local, NUM_TOKENS)
        per_token = 2 * 2 * 4 * 4 * sum(rank.heads[1] for rank in decode.ranks)  # K+V, layers, head_dim, float32
        assert written == NUM_TOKENS * per_token  # each decode rank's heads once, replicas included
        # Decode's prefix-cache hits (its first block) are not written.
        for rank in decode.ranks:
            rank.kv.data.zero_()
        again = target(decode, "r2", local, decode_bs, d, cached=decode_bs)
        assert (await prefill.writer.write(again, 0, NUM_TOKENS, remote)).bytes == (NUM_TOKENS - decode_bs) * per_token
        check_copied(prefill, decode, remote, local, NUM_TOKENS, skip_tokens=decode_bs)
    finally:
        await stop()


async def test_nothing_is_written_into_blocks_decode_let_go():
    prefill, decode, stop = await start(4, 2, 2, 4, 4)
    try:
        local = DECODE_BLOCKS
        push = target(decode, "gone", local, 4, 2)
        await prefill.writer.write(push, 0, 4, PREFILL_BLOCKS)  # handshake and one chunk while held
        for rank in decode.ranks:
            rank.kv.data.zero_()
        decode.pushed.release(push.transfer_id, b"p0")
        decode.pushed.abort("gone")  # decode frees the blocks
        with pytest.raises(KVTransferError, match="nothing was written"):
            await prefill.writer.write(push, 4, NUM_TOKENS, PREFILL_BLOCKS)
        assert not any(rank.kv.data.any() for rank in decode.ranks)
        other = target(decode, "other", [8, 9, 10, 14, 15, 16, 17], 4, 2)  # decode holds other blocks now
        forged = PushTarget(**{**{f: getattr(other, f) for f in other.__struct_fields__}, "block_ids": local})
        with pytest.raises(KVTransferError, match="refused"):
            await prefill.writer.write(forged, 0, NUM_TOKENS, PREFILL_BLOCKS)
        assert not any(rank.kv.data.any() for rank in decode.ranks)
    finally:
        await stop()
