"""L2: the KV reader and the side channel (through a real prefill handoff) over real ZMQ, fake MoRI-IO fabric."""

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec
import pytest
import torch

from common.bus import BusClient, BusServer
from common.engine.kv_cache import KVCache
from common.errors import HandshakeError, KVBlocksRefused, KVTransferError, PeerError
from common.kv_transfer.config import KVTransferConfig
from common.kv_transfer.leases import LeaseTable
from common.kv_transfer.mori import MoriBackend
from common.kv_transfer.backend import TransferBackend
from common.kv_transfer.ranges import BlockPairs, ByteRanges, KVLayout
from common.kv_transfer.rank_io import MAX_RANGES_PER_CALL, LocalRankIO, read_in_batches
from common.kv_transfer.reader import KVReader
from common.kv_transfer.side_channel import KVSideChannel
from common.kv_transfer.status import TransferStatus
from common.messages import (
    Ack,
    Fingerprint,
    Handshake,
    HandshakeReply,
    KVRankMemory,
    KVRequest,
    KVTransferParams,
    LeaseRenewed,
    ReleaseKV,
    RenewLease,
    TransportOffer,
)
from services.prefill.handoff import PrefillHandoff
from tests.fakes import mori as fake_mori
from tests.procs import eventually

GEOMETRY = dict(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float16, device="cpu")


def fingerprint(**over) -> Fingerprint:
    base = dict(model="tiny", dtype="float16", block_size=4, num_layers=2, num_kv_heads=2, head_dim=8,
                kv_layout=KVCache.LAYOUT, transfer_backend="mori")
    return Fingerprint(**{**base, **over})


def config(**over) -> KVTransferConfig:
    base = dict(kv_backend="mori", kv_transport="tcp", kv_lease_seconds=30.0, kv_handshake_timeout_s=1.0,
                kv_rpc_timeout_s=1.0, kv_renew_interval_s=5.0, kv_transfer_threads=2)
    cfg = KVTransferConfig(**{**base, **over})
    cfg.validate()
    return cfg


def open_rank(cfg: KVTransferConfig, kv: KVCache) -> LocalRankIO:
    """A TP 1 engine's one rank: all of ``kv``'s heads, registered with its transports."""
    return LocalRankIO.open(cfg, 0, (0, kv.num_kv_heads), kv.data, KVLayout.of(kv))


@dataclass
class Prefill:
    kv: KVCache
    handoff: PrefillHandoff
    released: list  # transfer ids the handoff unpinned, in order
    channel: KVSideChannel
    server: BusServer
    rank: LocalRankIO
    backend: MoriBackend
    transfer_ids: dict = field(default_factory=dict)  # request id -> the transfer id its leg got

    def params(self, block_ids: list[int], request_id: str = "t1") -> KVTransferParams:
        """A finished prefill leg: its transfer begun and leased, as the prefill role does it."""
        transfer_id = self.transfer_ids[request_id] = self.handoff.begin(request_id, b"gateway")
        expiry = self.handoff.lease(request_id, block_ids)
        return KVTransferParams(engine_id="prefill-0", kv_endpoint=self.server.endpoint, transfer_id=transfer_id,
                                block_ids=block_ids, num_tokens=self.kv.block_size * len(block_ids), first_token_id=1,
                                lease_expiry=expiry)

    async def unpinned(self) -> list[str]:
        """The transfer ids unpinned once every unpin handed to the engine ran."""
        await self.handoff.drain()
        return self.released


@pytest.fixture
def fake():
    yield fake_mori.install()
    fake_mori.uninstall()


@contextlib.asynccontextmanager
async def serving_prefill(kv: KVCache, fp: Fingerprint) -> AsyncIterator[Prefill]:
    """A prefill instance's KV side (handoff, side channel on a real bus server) over ``kv``, filled at random."""
    kv.data.copy_(torch.randn_like(kv.data))
    rank = open_rank(config(), kv)
    backend = rank.transports.backends["tcp"]
    released: list[str] = []

    async def unpin(transfer_id: str) -> None:
        released.append(transfer_id)

    handoff = PrefillHandoff("prefill-0", LeaseTable(30.0), unpin)
    channel = KVSideChannel("prefill-0", fp, [rank.memory], rank.transports.incarnation, handoff)
    server = BusServer("tcp://127.0.0.1:0", KVRequest, name="kv-prefill")
    channel.attach(server)
    await server.start()
    try:
        yield Prefill(kv, handoff, released, channel, server, rank, backend)
    finally:
        await server.close()
        rank.close()


@pytest.fixture
async def prefill(fake):
    async with serving_prefill(KVCache(num_blocks=16, **GEOMETRY), fingerprint()) as served:
        yield served


@pytest.fixture
async def decode(fake):
    made = []

    async def make(fp: Fingerprint | None = None, **over) -> tuple[KVReader, KVCache]:
        fp = fp or fingerprint()
        kv = KVCache(num_blocks=16, **{**GEOMETRY, "block_size": fp.block_size})
        cfg = config(**over)
        rank = open_rank(cfg, kv)
        conn = KVReader([rank], "decode-0", fp, cfg, rank.transports.chosen)
        made.append((conn, rank))
        return conn, kv

    yield make
    for conn, rank in made:
        await conn.close()
        rank.close()


# -- handshakes ---------------------------------------------------------------


async def test_handshake_roundtrip(prefill, decode):
    conn, _ = await decode()
    peer = await conn.peers.peer("prefill-0", prefill.server.endpoint)
    assert peer.links[0, 0].session == prefill.backend.session
    assert peer.ranks == [prefill.rank.memory] and peer.ranks[0].region == KVLayout.of(prefill.kv).region
    assert await conn.peers.peer("prefill-0", prefill.server.endpoint) is peer  # cached
    assert prefill.channel.num_handshakes == 1


async def test_a_restarted_prefill_at_the_same_endpoint_is_handshaken_again(prefill, decode):
    """Same engine id and endpoint, new KV memory: params naming the new one re-handshake; params of the
    old run fail instead of reading what a same-host mapping of the dead memory still shows."""
    conn, kv = await decode()
    old = prefill.params([3], request_id="before")
    old.incarnation = prefill.rank.transports.incarnation
    await conn.read_blocks(old, [1])
    restarted = open_rank(config(), prefill.kv)
    try:
        KVSideChannel("prefill-0", fingerprint(), [restarted.memory], restarted.transports.incarnation,
                      prefill.handoff).attach(prefill.server)
        new = prefill.params([4], request_id="after")
        new.incarnation = restarted.transports.incarnation
        await conn.read_blocks(new, [2])
        assert torch.equal(kv.data[2], prefill.kv.data[4])
        stale = prefill.params([5], request_id="stale")
        stale.incarnation = old.incarnation
        with pytest.raises(KVTransferError, match="from an earlier run of prefill-0"):
            await conn.read_blocks(stale, [3])
        assert not kv.data[3].any()
    finally:
        restarted.close()


async def test_concurrent_requests_share_one_handshake(prefill, decode):
    conn, kv = await decode()
    params = [prefill.params([i], f"t{i}") for i in range(8)]
    await asyncio.gather(*(conn.read_blocks(p, [8 + i]) for i, p in enumerate(params)))
    assert prefill.channel.num_handshakes == 1
    for i in range(8):
        assert torch.equal(kv.data[8 + i], prefill.kv.data[i])


async def test_handshake_timeout_fails_fast_and_is_retried(decode):
    calls = 0

    async def never_answer(msg):
        nonlocal calls
        calls += 1
        await asyncio.sleep(3600)

    server = BusServer("tcp://127.0.0.1:0", KVRequest, name="silent")
    server.on(Handshake, never_answer)
    await server.start()
    try:
        conn, _ = await decode(kv_handshake_timeout_s=0.3)
        start = time.perf_counter()
        results = await asyncio.gather(
            *(conn.peers.peer("prefill-0", server.endpoint) for _ in range(3)), return_exceptions=True
        )
        elapsed = time.perf_counter() - start
        assert all(isinstance(r, HandshakeError) and "timed out after 0.3 s" in str(r) for r in results)
        assert 0.3 <= elapsed < 1.5
        assert calls == 1  # three waiters, one attempt
        with pytest.raises(HandshakeError):
            await conn.peers.peer("prefill-0", server.endpoint)
        assert calls == 2  # the failure was not cached
    finally:
        await server.close()


async def test_fingerprint_mismatch_is_refused_naming_fields(prefill, decode):
    conn, _ = await decode(fingerprint(block_size=6, head_dim=16))
    with pytest.raises(HandshakeError, match="incompatible: decode cannot read our KV: block_size: prefill 4 and "
                                             "decode 6 differ and are not both powers of two; head_dim: prefill 8, "
                                             "decode 16"):
        await conn.peers.peer("prefill-0", prefill.server.endpoint)
    with pytest.raises(HandshakeError):
        await conn.peers.peer("prefill-0", prefill.server.endpoint)
    assert prefill.channel.num_handshakes == 2  # refusals are not cached


async def test_wrong_engine_behind_endpoint_is_refused(prefill, decode):
    conn, _ = await decode()
    with pytest.raises(HandshakeError, match="is engine 'prefill-0', not 'prefill-9'"):
        await conn.peers.peer("prefill-9", prefill.server.endpoint)


async def test_protocol_version_mismatch(prefill):
    client = BusClient(prefill.server.endpoint, timeout=1.0)
    try:
        with pytest.raises(PeerError) as err:
            await client.call(Handshake("d", fingerprint(), protocol_version=99))
        assert err.value.code == "protocol_version"
        with pytest.raises(PeerError) as err:
            await client.call(Handshake("d", fingerprint(dtype="bfloat16")))
        assert err.value.code == "incompatible" and err.value.param == "dtype"
    finally:
        await client.close()


# -- leases over the bus ------------------------------------------------------


async def test_renew_and_release_messages_change_lease_state(prefill):
    params = prefill.params([1, 2], "a")
    a = params.transfer_id
    client = BusClient(prefill.server.endpoint, timeout=1.0)
    try:
        await asyncio.sleep(0.01)
        reply = await client.call(RenewLease([a, "ghost"]))
        assert isinstance(reply, LeaseRenewed) and set(reply.expiry) == {a} and reply.expiry[a] > params.lease_expiry
        assert isinstance(await client.call(ReleaseKV([a])), Ack)
        assert a not in prefill.handoff.leases and await prefill.unpinned() == [a]
        await client.call(ReleaseKV([a]))  # a second release finds nothing to unpin
        assert await prefill.unpinned() == [a]
    finally:
        await client.close()


# -- reads --------------------------------------------------------------------


async def test_read_blocks_moves_scattered_blocks_and_releases(prefill, decode):
    conn, kv = await decode()
    remote, local = [5, 6, 7, 2, 9], [0, 1, 2, 3, 11]
    stats = await conn.read_blocks(prefill.params(remote), local)
    for r, l in zip(remote, local):
        assert torch.equal(kv.data[l], prefill.kv.data[r])
    assert stats.num_blocks == 5 and stats.num_ranges == 5  # whole blocks, one status each
    assert stats.bytes == 5 * kv.block_bytes
    await conn.releases.flush()
    assert await prefill.unpinned() == [prefill.transfer_ids["t1"]] and len(prefill.handoff) == 0


async def test_skip_leading_prefix_hits_are_not_read(prefill, decode):
    conn, kv = await decode()
    stats = await conn.read_blocks(prefill.params([1, 2, 3]), [4, 5, 6], skip_leading=2)
    assert stats.num_blocks == 1
    assert torch.equal(kv.data[6], prefill.kv.data[3])
    assert not kv.data[4].any() and not kv.data[5].any()
    full = await conn.read_blocks(prefill.params([1], "t2"), [7], skip_leading=1)
    assert full.bytes == 0
    await conn.releases.flush()
    assert await prefill.unpinned() == [prefill.transfer_ids["t1"], prefill.transfer_ids["t2"]]


def token_kv(kv: KVCache, block_ids: list[int], first: int, end: int) -> torch.Tensor:
    """K and V of a prompt's token positions ``[first, end)`` held in ``block_ids``: ``[tokens, heads, layers, 2,
    head_dim]``."""
    positions = torch.arange(first, end)
    return kv.data.transpose(1, 2)[torch.tensor(block_ids)[positions // kv.block_size], positions % kv.block_size]


@pytest.mark.parametrize(("decode_block_size", "local", "skip"),
                         [(8, [3, 7], 0), (8, [3, 7], 1), (2, [9, 1, 2, 3, 4, 0, 8], 2)])
async def test_a_decode_of_another_block_size_reads_token_positions(prefill, decode, decode_block_size, local, skip):
    conn, kv = await decode(fingerprint(block_size=decode_block_size))
    remote = [5, 6, 2, 9]  # 13 tokens in prefill's 4-token blocks
    params = msgspec.structs.replace(prefill.params(remote), num_tokens=13, block_size=4)
    stats = await conn.read_blocks(params, local, skip)
    first = skip * decode_block_size
    assert torch.equal(token_kv(kv, local, first, 13), token_kv(prefill.kv, remote, first, 13))
    assert not token_kv(kv, local, 0, first).any()  # prefix-cache hits are not overwritten
    assert stats.num_blocks == len(local) - skip and stats.bytes == (13 - first) * kv.block_bytes // decode_block_size
    await conn.releases.flush()
    assert await prefill.unpinned() == [prefill.transfer_ids["t1"]]


async def test_params_naming_another_block_size_than_the_peer_are_refused(prefill, decode):
    conn, _ = await decode(fingerprint(block_size=8))
    params = msgspec.structs.replace(prefill.params([1, 2]), block_size=8)  # prefill-0's blocks hold 4 tokens
    with pytest.raises(KVTransferError, match="names 8-token blocks, prefill-0 has 4"):
        await conn.read_blocks(params, [3, 4])
    await conn.releases.flush()
    assert await prefill.unpinned() == [prefill.transfer_ids["t1"]]


async def test_failed_transfer_raises_releases_and_rehandshakes(prefill, decode, fake):
    conn, _ = await decode()
    fake.knobs.fail_next = 1  # the two blocks' one merged range: both blocks fail
    with pytest.raises(KVTransferError, match="failed \\(2 of 2 ranges\\)"):
        await conn.read_blocks(prefill.params([1, 2]), [3, 4])
    await conn.releases.flush()
    assert await prefill.unpinned() == [prefill.transfer_ids["t1"]]
    await conn.read_blocks(prefill.params([1, 2], "t2"), [3, 4])
    assert prefill.channel.num_handshakes == 2  # the failed peer was forgotten


async def test_a_backend_answering_fewer_statuses_than_ranges_fails_the_read(prefill, decode, monkeypatch):
    """Every range needs its own SUCCESS: a status list one short counts the missing range as failed."""
    conn, _ = await decode()
    backend = conn.ranks[0].transports.backends["tcp"]
    transfer = backend.transfer
    monkeypatch.setattr(backend, "transfer", lambda *args, **kwargs: transfer(*args, **kwargs)[:-1])
    with pytest.raises(KVTransferError, match="failed \\(1 of 2 ranges\\)"):
        await conn.read_blocks(prefill.params([0, 2]), [1, 3])


async def test_lease_is_renewed_during_a_slow_read(prefill, decode, fake):
    prefill.handoff.leases.lease_seconds = 1.0
    sweeper = asyncio.create_task(prefill.handoff.run_sweeper(0.05))
    try:
        conn, kv = await decode(kv_renew_interval_s=0.1, kv_lease_seconds=1.0)
        fake.knobs.delay_s = 2.0  # twice the lease: only the renewals keep it
        await conn.read_blocks(prefill.params([4]), [0])  # the lease is confirmed after the read
        assert torch.equal(kv.data[0], prefill.kv.data[4])
        assert prefill.released == []  # no expiry released it; the ReleaseKV comes after the read
    finally:
        sweeper.cancel()


async def test_expired_lease_is_detected_before_reading(prefill, decode):
    conn, _ = await decode()
    params = prefill.params([1])
    prefill.handoff.release(prefill.transfer_ids["t1"], b"decode")  # prefill already freed the blocks
    params.lease_expiry = time.time() - 1
    with pytest.raises(KVTransferError, match="ended before the read"):
        await conn.read_blocks(params, [2])


@pytest.mark.parametrize("lease_left_s", [30.0, 0.0])  # confirmed after the read; also renewed before it
async def test_params_naming_other_blocks_than_the_lease_holds_are_refused(prefill, decode, lease_left_s):
    conn, kv = await decode()
    params = msgspec.structs.replace(prefill.params([1, 2]), block_ids=[5, 6],  # the lease holds 1 and 2
                                     lease_expiry=time.time() + lease_left_s)
    with pytest.raises(KVBlocksRefused, match="names 2 blocks that are not the 2 its lease holds"):
        await conn.read_blocks(params, [3, 4])
    if not lease_left_s:
        assert not kv.data[3].any() and not kv.data[4].any()  # refused before reading
    await conn.releases.flush()
    assert await prefill.unpinned() == [prefill.transfer_ids["t1"]]  # and the transfer was still released


async def test_cancel_waits_for_the_inflight_read_then_releases(prefill, decode, fake):
    conn, kv = await decode()
    fake.knobs.delay_s = 0.5
    started, finished = threading.Event(), threading.Event()
    backend = conn.ranks[0].transports.backends["tcp"]
    transfer = backend.transfer

    def observed_transfer(*args, **kwargs):
        started.set()
        try:
            return transfer(*args, **kwargs)
        finally:
            finished.set()

    backend.transfer = observed_transfer
    task = asyncio.create_task(conn.read_blocks(prefill.params([3]), [1]))
    await eventually(started.is_set, timeout=30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert finished.is_set()  # returned only after the backend finished
    assert prefill.transfer_ids["t1"] in prefill.handoff.leases  # not released before the read stopped
    await conn.releases.flush()
    assert await prefill.unpinned() == [prefill.transfer_ids["t1"]]


@pytest.mark.parametrize(
    "remote, local, skip, match",
    [([1, 2], [1], 0, "1 local blocks of 4 tokens for 8 tokens"), ([1], [1], 2, "skip_leading=2"),
     ([99], [1], 0, "remote block id 99")],
)
async def test_bad_requests_are_kv_transfer_errors_and_still_release(prefill, decode, remote, local, skip, match):
    conn, _ = await decode()
    with pytest.raises(KVTransferError, match=match):
        await conn.read_blocks(prefill.params(remote), local, skip)
    await conn.releases.flush()
    assert await prefill.unpinned() == [prefill.transfer_ids["t1"]]


async def test_sharded_read_reports_every_shard(prefill, decode):
    conn, kv = await decode(kv_read_shards=2)
    remote, local = [0, 2, 4, 6], [1, 3, 5, 7]
    stats = await conn.read_blocks(prefill.params(remote), local)
    assert stats.num_ranges == 4
    for r, l in zip(remote, local):
        assert torch.equal(kv.data[l], prefill.kv.data[r])


async def test_a_failed_first_shard_fails_the_read_even_if_the_last_succeeds(prefill, decode, fake):
    conn, _ = await decode(kv_read_shards=2)
    fake.knobs.fail_next = 1  # the first batch submitted fails, the second succeeds
    with pytest.raises(KVTransferError, match="1 of 2 ranges"):
        await conn.read_blocks(prefill.params([0, 2]), [1, 3])


@pytest.mark.parametrize(
    "reply_change, rank_change, match",
    [(dict(fingerprint=fingerprint(num_layers=4)), {}, "num_layers: prefill 4, decode 2"),
     ({}, dict(block_bytes=123), "123-byte blocks"),
     ({}, dict(transports=[]), "no common KV transport \\(forced tcp\\): we offer tcp, the peer offers none"),
     ({}, dict(num_blocks=10**6), "does not hold its 1000000 blocks"),
     ({}, dict(rank=1), "describes ranks \\[1\\] for TP 1"),
     ({}, dict(first_head=1, num_heads=1, block_bytes=256), "no prefill rank holds KV head 0")],
)
async def test_decode_checks_the_reply_itself(prefill, decode, reply_change, rank_change, match):
    """A prefill that does not check (older build, bug) still cannot hand us mismatched KV."""
    layout = KVLayout.of(prefill.kv)
    offer = TransportOffer("tcp", "mori", prefill.backend.session, prefill.backend.backend_meta())
    rank = KVRankMemory(rank=0, first_head=0, num_heads=2, host_id="h", memory="cpu", transports=[offer],
                        region=layout.region, block_bytes=layout.block_bytes, num_blocks=layout.num_blocks)
    good = HandshakeReply(engine_id="prefill-0", fingerprint=fingerprint(), ranks=[rank])
    bad = msgspec.structs.replace(good, ranks=[msgspec.structs.replace(rank, **rank_change)], **reply_change)

    async def sloppy(msg):
        return bad

    server = BusServer("tcp://127.0.0.1:0", KVRequest, name="sloppy")
    server.on(Handshake, sloppy)
    await server.start()
    try:
        conn, _ = await decode()
        with pytest.raises(HandshakeError, match=match):
            await conn.peers.peer("prefill-0", server.endpoint)
    finally:
        await server.close()


async def test_lease_lost_during_the_read_fails_it(prefill, decode, fake):
    conn, _ = await decode(kv_renew_interval_s=0.1)
    fake.knobs.delay_s = 0.5
    task = asyncio.create_task(conn.read_blocks(prefill.params([2]), [0]))
    await asyncio.sleep(0.05)
    prefill.handoff.abort("t1", b"gateway")  # prefill freed the blocks mid-read (as when its sweeper expires the lease)
    with pytest.raises(KVTransferError, match="ended during the read"):
        await task


async def test_lease_released_during_a_short_read_fails_it(prefill, decode, fake):
    """No renewal falls inside a read shorter than the renew interval: the lease is confirmed after it."""
    conn, _ = await decode(kv_renew_interval_s=5.0)
    fake.knobs.delay_s = 0.3
    task = asyncio.create_task(conn.read_blocks(prefill.params([2]), [0]))
    await asyncio.sleep(0.05)
    prefill.handoff.abort("t1", b"gateway")  # the gateway aborted this decode (to retry it elsewhere)
    with pytest.raises(KVTransferError, match="ended during the read"):
        await task


class RecordingBackend:
    """``read`` as a backend's: records each call's range count, fails the calls listed in ``failing``."""

    def __init__(self, failing: set[int] = frozenset()):
        self.calls: list[int] = []
        self.failing = failing

    def read(self, session, local_addrs, remote_addrs, lengths):
        self.calls.append(len(lengths))
        status = TransferStatus.FAILED if len(self.calls) - 1 in self.failing else TransferStatus.SUCCESS
        return [status] * len(lengths)


def many_ranges(n: int) -> ByteRanges:
    return ByteRanges(list(range(0, 2 * n, 2)), list(range(1, 2 * n, 2)), [1] * n)


def test_a_long_read_goes_to_the_backend_in_bounded_batches():
    backend = RecordingBackend()
    n = 2 * MAX_RANGES_PER_CALL + 7
    assert read_in_batches(backend, "s", many_ranges(n)) == [TransferStatus.SUCCESS] * n
    assert backend.calls == [MAX_RANGES_PER_CALL, MAX_RANGES_PER_CALL, 7]


def test_a_failed_batch_stops_the_read_and_fails_every_range_left():
    backend = RecordingBackend(failing={0})
    n = 3 * MAX_RANGES_PER_CALL
    statuses = read_in_batches(backend, "s", many_ranges(n))
    assert statuses == [TransferStatus.FAILED] * n and backend.calls == [MAX_RANGES_PER_CALL]


class RangesBackend(TransferBackend):
    """A backend copying byte ranges only (as Mooncake, shm and MoRI do): records each ``transfer``'s ranges and
    fails the ranges whose local address is in ``failing``."""

    name = "recording"
    session = "recording"

    def __init__(self, failing: set[int] = frozenset()):
        self.calls: list[ByteRanges] = []
        self.failing = failing

    build = register = backend_meta = connect = close = None

    def transfer(self, peer_session, local_addrs, remote_addrs, lengths, *, write):
        self.calls.append(ByteRanges(local_addrs, remote_addrs, lengths))
        return [TransferStatus.FAILED if a in self.failing else TransferStatus.SUCCESS for a in local_addrs]


def test_whole_blocks_reach_a_ranges_backend_merged_and_come_back_one_status_per_block():
    backend = RangesBackend(failing={1000 + 7 * 10})
    tail = ByteRanges([1000 + 9 * 10, 1000 + 9 * 10 + 5], [5000 + 2 * 10, 5000 + 2 * 10 + 5], [3, 3])
    blocks = BlockPairs(1000, 5000, 10, [3, 4, 5, 7, 8], [0, 1, 2, 9, 10], tail)
    statuses = read_in_batches(backend, "s", blocks)
    assert backend.calls == [ByteRanges([1030, 1070, *tail.local_addrs], [5000, 5090, *tail.remote_addrs],
                                        [30, 20, 3, 3])]
    S, F = TransferStatus.SUCCESS, TransferStatus.FAILED
    assert statuses == [S, S, S, F, F, S, S]  # blocks 7 and 8 were one range; then the tail's two


def test_many_whole_blocks_go_to_the_backend_in_bounded_batches():
    backend = RangesBackend()
    n = MAX_RANGES_PER_CALL + 3
    blocks = BlockPairs(0, 0, 1, list(range(0, 2 * n, 2)), list(range(n)), ByteRanges([2 * n + 1], [n + 1], [1]))
    assert read_in_batches(backend, "s", blocks) == [TransferStatus.SUCCESS] * (n + 1)
    assert [len(call.lengths) for call in backend.calls] == [MAX_RANGES_PER_CALL, 4]
