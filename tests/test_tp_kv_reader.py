"""L2: TP-aware KV reads in one process: prefill ranks and decode ranks, each with its own KV cache of its heads
in a shared-memory file (the real shm backend), the decode's worker ranks behind real ``RankAgent``s over ZMQ.

Every (prefill TP, decode TP, block sizes) combination must copy exactly each decode rank's heads of every
token from the prefill rank(s) holding them; a failed rank fails the whole read (the completion quorum).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from common.bus import BusServer
from common.client_pool import ClientPool
from common.engine.kv_cache import KVCache
from common.engine.parallel import TensorParallel
from common.errors import KVTransferError
from common.kv_transfer.config import KVTransferConfig
from common.kv_transfer.leases import LeaseTable
from common.kv_transfer.rank_agent import RankAgent
from common.kv_transfer.rank_io import LocalRankIO, RankIO, RemoteRankIO
from common.kv_transfer.ranges import KVLayout
from common.kv_transfer.reader import KVReader
from common.kv_transfer.shm import SharedKVFile
from common.kv_transfer.side_channel import KVSideChannel
from common.messages import Fingerprint, KVRequest, KVTransferParams
from services.prefill.handoff import PrefillHandoff

LAYERS, HEAD_DIM, BLOCKS = 2, 4, 32
CONFIG = KVTransferConfig(kv_transport="shm", kv_handshake_timeout_s=10.0, kv_rpc_timeout_s=10.0)


def fingerprint(num_kv_heads: int, block_size: int, tp: int) -> Fingerprint:
    return Fingerprint(model="m", dtype="float32", block_size=block_size, num_layers=LAYERS, num_kv_heads=num_kv_heads,
                       head_dim=HEAD_DIM, kv_layout=KVCache.LAYOUT, transfer_backend="mooncake",
                       tensor_parallel_size=tp)  # fmt: skip


@dataclass
class Rank:
    """One rank's KV cache (its heads, in a shared-memory file) and its transfer side."""

    heads: tuple[int, int]
    kv: KVCache
    file: SharedKVFile
    io: LocalRankIO


def open_ranks(num_kv_heads: int, block_size: int, tp: int) -> list[Rank]:
    ranks = []
    for r in range(tp):
        heads = TensorParallel(r, tp).kv_heads(num_kv_heads)
        file = SharedKVFile(fallback=False)
        kv = KVCache(BLOCKS, LAYERS, block_size, heads[1], HEAD_DIM, torch.float32, "cpu", file.allocate)
        ranks.append(Rank(heads, kv, file, LocalRankIO.open(CONFIG, r, heads, kv.data, KVLayout.of(kv))))
    return ranks


def close_ranks(ranks: list[Rank]) -> None:
    for rank in ranks:
        rank.io.close()
        rank.file.close()


def token_heads(rank: Rank, block_ids: list[int], num_tokens: int) -> torch.Tensor:
    """``[num_tokens, its heads, layers, 2, head_dim]``: the rank's KV of a prompt held in ``block_ids``."""
    bs = rank.kv.block_size
    positions = torch.arange(num_tokens)
    blocks = torch.tensor(block_ids)[positions // bs]
    return rank.kv.data[blocks, :, positions % bs]


@dataclass
class Prefill:
    ranks: list[Rank]
    handoff: PrefillHandoff
    server: BusServer
    block_size: int
    released: list[str]  # transfer ids unpinned, in order

    def params(self, request_id: str, block_ids: list[int], num_tokens: int) -> KVTransferParams:
        transfer_id = self.handoff.begin(request_id, b"gateway")
        return KVTransferParams("p0", self.server.endpoint, transfer_id, block_ids, num_tokens, first_token_id=1,
                                lease_expiry=self.handoff.lease(request_id, block_ids), incarnation="",
                                block_size=self.block_size, tensor_parallel_size=len(self.ranks))  # fmt: skip


async def start_prefill(num_kv_heads: int, block_size: int, tp: int) -> Prefill:
    ranks = open_ranks(num_kv_heads, block_size, tp)
    generator = torch.Generator().manual_seed(tp * 100 + block_size)
    for rank in ranks:  # every head of every rank distinct
        rank.kv.data.copy_(torch.randn(rank.kv.data.shape, generator=generator))
    for a, b in zip(ranks, ranks[1:]):  # replicated heads hold the same values, as real ranks compute them
        if a.heads == b.heads:
            b.kv.data.copy_(a.kv.data)

    released: list[str] = []

    async def unpin(transfer_id: str) -> None:
        released.append(transfer_id)

    handoff = PrefillHandoff("p0", LeaseTable(30.0), unpin)
    server = BusServer("tcp://127.0.0.1:0", KVRequest, name="kv-p0")
    KVSideChannel("p0", fingerprint(num_kv_heads, block_size, tp), [r.io.memory for r in ranks], "",
                  handoff).attach(server)
    await server.start()
    return Prefill(ranks, handoff, server, block_size, released)


@dataclass
class Decode:
    ranks: list[Rank]
    agents: list[RankAgent]
    reader: KVReader
    clients: ClientPool


def start_decode(num_kv_heads: int, block_size: int, tp: int, config: KVTransferConfig = CONFIG) -> Decode:
    """Rank 0 reads in this process; ranks 1.. through their agents, as in a real instance."""
    ranks = open_ranks(num_kv_heads, block_size, tp)
    agents = [RankAgent(rank.io) for rank in ranks[1:]]
    clients = ClientPool(name="ranks", timeout=10.0)
    ios: list[RankIO] = [ranks[0].io, *(RemoteRankIO(a.io.memory, a.start(), clients, config) for a in agents)]
    reader = KVReader(ios, "d0", fingerprint(num_kv_heads, block_size, tp), config, {})
    return Decode(ranks, agents, reader, clients)


async def stop(prefill: Prefill, decode: Decode) -> None:
    await decode.reader.close()
    await decode.clients.close()
    for agent in decode.agents:
        agent.close()  # closes its rank's io
    close_ranks(decode.ranks[:1])
    for rank in decode.ranks[1:]:
        rank.file.close()
    await prefill.server.close()
    close_ranks(prefill.ranks)


def check_copied(prefill: Prefill, decode: Decode, remote: list[int], local: list[int], num_tokens: int,
                 skip_tokens: int = 0) -> None:
    """Each decode rank holds, for every token from ``skip_tokens`` on, exactly the heads it owns."""
    full = {}  # global head -> [num_tokens, layers, 2, head_dim], from whichever prefill rank holds it
    for rank in prefill.ranks:
        values = token_heads(rank, remote, num_tokens)
        for i in range(rank.heads[1]):
            full.setdefault(rank.heads[0] + i, values[:, i])
    for rank in decode.ranks:
        got = token_heads(rank, local, num_tokens)
        for i in range(rank.heads[1]):
            assert torch.equal(got[skip_tokens:, i], full[rank.heads[0] + i][skip_tokens:]), (rank.heads, i)
            assert not got[:skip_tokens, i].any()  # prefix-cache hits are not overwritten


COMBINATIONS = [  # (KV heads, prefill TP, decode TP)
    (4, 1, 1), (4, 1, 2), (4, 2, 1), (4, 2, 2), (4, 1, 4), (4, 4, 2), (4, 2, 4),
    (2, 4, 1), (2, 1, 4), (2, 4, 2),  # TP beyond the KV heads: ranks share (replicate) a head
]


@pytest.mark.parametrize(("heads", "p", "d"), COMBINATIONS)
@pytest.mark.parametrize(("prefill_bs", "decode_bs"), [(4, 4), (4, 8), (8, 4)])
async def test_every_decode_rank_reads_exactly_its_heads(heads, p, d, prefill_bs, decode_bs):
    prefill = await start_prefill(heads, prefill_bs, p)
    decode = start_decode(heads, decode_bs, d)
    try:
        num_tokens = 27  # a partial last block on both sides
        remote = [5, 2, 9, 11, 30, 0, 7][: -(-num_tokens // prefill_bs)]
        local = [3, 4, 12, 13, 20, 21, 1][: -(-num_tokens // decode_bs)]
        stats = await decode.reader.read_blocks(prefill.params("r", remote, num_tokens), local)
        check_copied(prefill, decode, remote, local, num_tokens)
        # Every decode rank reads each of its heads of every token once (a head replicated on several
        # decode ranks is read by each of them).
        per_token = 2 * LAYERS * HEAD_DIM * 4 * sum(rank.heads[1] for rank in decode.ranks)  # float32
        assert stats.bytes == num_tokens * per_token
        # Prefix-cache hits: the leading local block is not read again.
        again = await decode.reader.read_blocks(prefill.params("r2", remote, num_tokens), local, skip_leading=1)
        assert again.bytes == (num_tokens - decode_bs) * per_token
    finally:
        await stop(prefill, decode)


async def test_a_rank_whose_agent_is_gone_fails_the_whole_read_and_still_releases():
    prefill = await start_prefill(4, 4, 1)
    short = KVTransferConfig(kv_transport="shm", kv_read_timeout_s=1, kv_rpc_timeout_s=1.0)
    decode = start_decode(4, 4, 2, short)
    try:
        ok = prefill.params("ok", [1, 2], 8)
        await decode.reader.read_blocks(ok, [3, 4])  # handshake while all live
        decode.agents[0].close()  # rank 1 stops answering: its part of every read fails
        lost = prefill.params("lost", [1, 2], 8)
        with pytest.raises(KVTransferError, match=f"reading transfer {lost.transfer_id} from p0 failed"):
            await decode.reader.read_blocks(lost, [5, 6])
        await decode.reader.releases.flush()
        await prefill.handoff.drain()
        assert prefill.released == [ok.transfer_id, lost.transfer_id]
    finally:
        await stop(prefill, decode)
