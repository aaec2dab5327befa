"""L1: block ranges, status aggregation, leases, config and handshake metadata (no I/O)."""

import random

import msgspec
import pytest
import torch

from common.arith import ceil_div
from common.config import ConfigError
from common.engine.kv_cache import KVCache
from common.kv_transfer.config import KVTransferConfig
from common.kv_transfer.leases import LeaseTable
from common.kv_transfer.ranges import BlockTable, ByteRanges, KVLayout, block_ranges, token_ranges
from common.kv_transfer.status import TransferQuorum, TransferStatus, aggregate
from common.messages import (
    Fingerprint,
    HandshakeReply,
    KVRankMemory,
    KVTransferParams,
    MemoryRegion,
    Reply,
    TransportOffer,
)
from tests.procs import Clock

S, F, P = TransferStatus.SUCCESS, TransferStatus.FAILED, TransferStatus.PENDING
BB = 100  # block bytes


def ranges(local, remote, local_base=10_000, remote_base=50_000, n=64):
    return block_ranges(
        local, remote, local_base=local_base, remote_base=remote_base,
        block_bytes=BB, local_num_blocks=n, remote_num_blocks=n,
    )


# -- ranges -------------------------------------------------------------------


def test_consecutive_on_both_sides_is_one_range():
    r = ranges([3, 4, 5, 6], [10, 11, 12, 13])
    assert r == ([10_000 + 3 * BB], [50_000 + 10 * BB], [4 * BB])
    assert r.total_bytes == 4 * BB


def test_run_breaks_when_either_side_breaks():
    # local consecutive, remote jumps after 2
    assert ranges([0, 1, 2], [5, 6, 9]).lengths == [2 * BB, BB]
    # remote consecutive, local jumps after 1
    r = ranges([0, 7, 8], [5, 6, 7])
    assert r.local_addrs == [10_000, 10_000 + 7 * BB]
    assert r.remote_addrs == [50_000 + 5 * BB, 50_000 + 6 * BB]
    assert r.lengths == [BB, 2 * BB]


def test_descending_ids_are_not_merged():
    assert ranges([5, 4], [5, 4]).lengths == [BB, BB]


def test_single_block_and_empty():
    assert ranges([7], [2]) == ([10_000 + 7 * BB], [50_000 + 2 * BB], [BB])
    assert ranges([], []) == ([], [], [])


def test_byte_offsets_follow_block_major_layout():
    kv = KVCache(num_blocks=6, num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float16, device="cpu")
    layout = KVLayout.of(kv)
    assert layout.block_bytes == 2 * 2 * 4 * 2 * 8 * 2
    assert layout.region == MemoryRegion(kv.data.data_ptr(), 6 * layout.block_bytes)
    r = block_ranges([2], [0], local_base=layout.base_addr, remote_base=0, block_bytes=layout.block_bytes,
                     local_num_blocks=6, remote_num_blocks=1)
    assert r.local_addrs[0] == kv.block_view(2).data_ptr()


@pytest.mark.parametrize(
    "local, remote, match",
    [([1, 2], [1], "2 local blocks but 1 remote"), ([64], [0], "local block id 64"),
     ([0], [-1], "remote block id -1"), ([3, 3], [1, 2], "duplicate local")],
)
def test_bad_block_lists_are_value_errors(local, remote, match):
    with pytest.raises(ValueError, match=match):
        ranges(local, remote)


# -- statuses -----------------------------------------------------------------


@pytest.mark.parametrize(
    "statuses, expected",
    [([F, S], F), ([S, F], F), ([S, P], P), ([P, S, F], F), ([], S), ([S, S, S], S)],
)
def test_aggregate_looks_at_every_status(statuses, expected):
    assert aggregate(statuses) is expected


def test_fail_then_success_is_not_done():
    q = TransferQuorum(1)
    assert q.report(0, [F, S]) is F
    assert q.state is not S


def test_duplicate_reports_never_complete_the_quorum_early():
    q = TransferQuorum(world_size=2)
    assert q.report(0, [S]) is P
    assert q.report(0, [S]) is P  # rank 0 again: still one distinct rank
    assert q.state is not S
    assert q.report(1, [S, S]) is S
    assert q.state is S


def test_one_rank_failure_fails_the_request_before_the_quorum():
    q = TransferQuorum(world_size=3)
    assert q.report(2, [S, F]) is F


def test_a_failure_stays_whatever_is_reported_after_it():
    q = TransferQuorum(world_size=2)
    assert q.report(0, [F]) is F
    assert q.report(0, [S]) is F  # the same rank again, now successful: still failed
    assert q.report(1, [S]) is F


def test_a_pending_status_keeps_a_full_quorum_pending():
    q = TransferQuorum(world_size=2)
    q.report(0, [S])
    assert q.report(1, [S, P]) is P
    assert q.report(1, [S, S]) is S


def test_reset_clears_pending_state_and_failures():
    q = TransferQuorum(world_size=2)
    q.report(0, [S])
    q.report(1, [F])
    q.reset()
    assert q.state is P
    assert q.report(1, [S]) is P  # rank 0's report is gone too
    assert q.report(0, [S]) is S


@pytest.mark.parametrize("world_size", [0, -1])
def test_a_world_size_below_one_is_refused(world_size):
    with pytest.raises(ValueError, match="world_size"):
        TransferQuorum(world_size)


def test_an_unknown_rank_is_an_error():
    with pytest.raises(ValueError, match="rank 2"):
        TransferQuorum(2).report(2, [S])
    with pytest.raises(ValueError, match="rank -1"):
        TransferQuorum(2).report(-1, [S])


# -- leases -------------------------------------------------------------------


@pytest.fixture
def table():
    clock = Clock()
    return LeaseTable(10.0, clock=clock), clock


def test_start_counts_and_expiry(table):
    t, clock = table
    assert t.start("a") == 1010.0
    t.start("b")
    assert len(t) == 2 and "a" in t
    with pytest.raises(ValueError, match="already has a lease"):
        t.start("a")


def test_expired_ends_only_overdue_leases_once(table):
    t, clock = table
    t.start("a")
    clock.now += 5
    t.start("b")
    clock.now += 5  # a is due (1010), b is not (1015)
    assert t.expired() == ["a"]
    assert t.expired() == []
    assert "a" not in t and "b" in t


def test_renew_pushes_expiry_and_skips_unknown(table):
    t, clock = table
    t.start("a")
    clock.now += 8
    assert t.renew(["a", "ghost"]) == {"a": 1018.0}
    clock.now += 8  # 1016 < 1018: alive thanks to the renewal
    assert t.expired() == []
    clock.now += 2
    assert t.expired() == ["a"]


def test_end_is_idempotent_and_unknown_ids_are_ignored(table):
    t, clock = table
    t.start("a")
    assert t.end("a") is True
    assert t.end("a") is False
    assert t.end("never") is False
    assert len(t) == 0
    clock.now += 100
    assert t.expired() == []  # an ended lease never expires later


def test_bad_lease_seconds():
    with pytest.raises(ValueError):
        LeaseTable(0)


# -- config -------------------------------------------------------------------


def test_config_defaults_validate_and_bad_values_name_the_flag():
    KVTransferConfig().validate()
    with pytest.raises(ConfigError, match="--kv-renew-interval-s"):
        KVTransferConfig(kv_lease_seconds=2.0, kv_renew_interval_s=5.0).validate()
    with pytest.raises(ConfigError, match="--kv-handshake-timeout-s"):
        KVTransferConfig(kv_handshake_timeout_s=0).validate()
    with pytest.raises(ConfigError, match="--kv-read-shards"):
        KVTransferConfig(kv_read_shards=8, kv_transfer_threads=2).validate()


# -- metadata over msgspec ----------------------------------------------------


def fingerprint(**over):
    base = dict(model="m", dtype="float16", block_size=16, num_layers=2, num_kv_heads=2,
                head_dim=8, kv_layout="block-major", transfer_backend="mooncake")
    return Fingerprint(**{**base, **over})


def test_handshake_reply_and_params_roundtrip():
    rank = KVRankMemory(
        rank=0, first_head=0, num_heads=2, host_id="h/boot", memory="cuda",
        transports=[TransportOffer("nvlink", "nvlink", "ipc", b"\x00\xff"), TransportOffer("rdma", "mori", "k")],
        region=MemoryRegion(2**47 + 5, 1 << 30), block_bytes=4096, num_blocks=1024,
    )
    reply = HandshakeReply(engine_id="p0", fingerprint=fingerprint(tensor_parallel_size=2),
                           ranks=[rank, msgspec.structs.replace(rank, rank=1, first_head=1)], incarnation="i")
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(reply), type=Reply)
    assert decoded == reply
    params = KVTransferParams(engine_id="p0", kv_endpoint="tcp://h:1", transfer_id="t", block_ids=[3, 1, 2],
                              num_tokens=40, first_token_id=7, lease_expiry=1.5e9, tensor_parallel_size=2)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(params), type=KVTransferParams) == params


def test_fingerprint_differences_name_fields():
    assert fingerprint().differences(fingerprint(block_size=32, dtype="bfloat16")) == ["dtype", "block_size"]


# -- token ranges (different block sizes) -------------------------------------

LAYERS, HEADS, DIM = 3, 2, 4


def filled_cache(block_size: int, num_blocks: int = 24) -> KVCache:
    kv = KVCache(num_blocks=num_blocks, num_layers=LAYERS, block_size=block_size, num_kv_heads=HEADS, head_dim=DIM,
                 dtype=torch.float16, device="cpu")
    kv.data.copy_(torch.randn_like(kv.data))
    return kv


def expected_read(decode: KVCache, prefill: KVCache, local_ids: list[int], remote_ids: list[int], first: int,
                  end: int) -> torch.Tensor:
    """``decode.data`` after token positions ``[first, end)`` of the prompt were copied from ``prefill``."""
    out = decode.data.clone()
    positions = torch.arange(first, end)
    local_blocks = torch.tensor(local_ids, dtype=torch.long)[positions // decode.block_size]
    remote_blocks = torch.tensor(remote_ids, dtype=torch.long)[positions // prefill.block_size]
    source = prefill.data[remote_blocks, :, :, positions % prefill.block_size]  # [tokens, layers, 2, heads, dim]
    out.permute(0, 3, 1, 2, 4, 5)[local_blocks, positions % decode.block_size] = source
    return out


def copy_ranges(into: KVCache, source: KVCache, r: ByteRanges) -> None:
    """What a backend read does, on two caches whose layouts are based at 0."""
    dst, src = into.data.view(-1).view(torch.uint8), source.data.view(-1).view(torch.uint8)
    for la, ra, n in zip(*r):
        dst[la:la + n] = src[ra:ra + n]


def blocks_of(kv: KVCache, block_ids: list[int]) -> BlockTable:
    return BlockTable(KVLayout(0, kv.block_bytes, kv.num_blocks), kv.block_size, block_ids)


def scattered(n: int, seed: int, num_blocks: int = 24) -> list[int]:
    """``n`` distinct block ids, some in consecutive runs, as a block manager leaves them."""
    ids = list(range(num_blocks))
    random.Random(seed).shuffle(ids)
    return sorted(ids[:n], key=lambda b: (b // 3, b))


@pytest.mark.parametrize("remote_size, local_size", [(4, 8), (8, 4), (4, 16), (16, 4), (8, 8)])
@pytest.mark.parametrize("num_tokens", [1, 3, 4, 8, 13, 16, 31, 32, 47])
@pytest.mark.parametrize("skip_leading", [0, 1, 2])
def test_token_ranges_read_exactly_the_tokens_decode_lacks(remote_size, local_size, num_tokens, skip_leading):
    remote_ids = scattered(ceil_div(num_tokens, remote_size), seed=num_tokens)
    local_ids = scattered(ceil_div(num_tokens, local_size), seed=num_tokens + 1)
    skip_leading = min(skip_leading, len(local_ids))
    prefill, decode = filled_cache(remote_size), filled_cache(local_size)
    first = min(skip_leading * local_size, num_tokens)
    expected = expected_read(decode, prefill, local_ids, remote_ids, first, num_tokens)
    r = token_ranges(blocks_of(decode, local_ids), blocks_of(prefill, remote_ids), num_layers=LAYERS,
                     num_tokens=num_tokens, skip_leading=skip_leading)
    copy_ranges(decode, prefill, r)
    assert torch.equal(decode.data, expected)  # the missing tokens, byte for byte, and nothing else
    assert r.total_bytes == (num_tokens - first) * 2 * LAYERS * HEADS * DIM * 2


@pytest.mark.parametrize("remote_size, local_size, expected", [(16, 32, 64 * 32 * 2 - 63), (32, 16, 128 * 32 - 63),
                                                                (16, 16, 1)])
def test_token_ranges_merge_what_is_contiguous_on_both_sides(remote_size, local_size, expected):
    """A 2,048-token prompt, 16 layers, consecutive block ids on both sides: pieces merge across block
    boundaries only where both sides continue (between equal block sizes, into one range)."""
    def side(block_size: int) -> BlockTable:
        return BlockTable(KVLayout(1 << 20, 16 * 2 * block_size * 64, 200), block_size,
                          list(range(10, 10 + 2048 // block_size)))

    r = token_ranges(side(local_size), side(remote_size), num_layers=16, num_tokens=2048)
    assert len(r.lengths) == expected
    assert r.total_bytes == 2048 * 16 * 2 * 64


@pytest.mark.parametrize(
    "local_ids, remote_ids, over, match",
    [([0], [0, 1], {}, "1 local blocks of 8 tokens for 9 tokens \\(need 2\\)"),
     ([0, 1], [0, 1], {}, "2 remote blocks of 4 tokens for 9 tokens \\(need 3\\)"),
     ([0, 1], [0, 1, 24], {}, "remote block id 24"),
     ([3, 3], [0, 1, 2], {}, "duplicate local"),
     ([0, 1], [0, 1, 2], {"skip_leading": 3}, "skip_leading=3"),
     ([0, 1], [0, 1, 2], {"num_layers": 5}, "do not hold 10 planes")],
)
def test_token_ranges_refuse_block_lists_that_do_not_fit(local_ids, remote_ids, over, match):
    decode, prefill = filled_cache(8), filled_cache(4)
    with pytest.raises(ValueError, match=match):
        token_ranges(blocks_of(decode, local_ids), blocks_of(prefill, remote_ids),
                     **{"num_layers": LAYERS, "num_tokens": 9, **over})


def test_token_ranges_refuse_different_token_sizes():
    decode = filled_cache(8)
    wide = BlockTable(KVLayout(0, 2 * filled_cache(4).block_bytes, 24), 4, [0, 1, 2])
    with pytest.raises(ValueError, match="bytes per token and plane locally"):
        token_ranges(blocks_of(decode, [0, 1]), wide, num_layers=LAYERS, num_tokens=9)


def test_token_ranges_refuse_block_sizes_that_do_not_divide():
    decode, prefill = filled_cache(8), filled_cache(12)
    with pytest.raises(ValueError, match="block sizes 8 and 12: neither divides the other"):
        token_ranges(blocks_of(decode, [0, 1]), blocks_of(prefill, [0, 1]), num_layers=LAYERS, num_tokens=16)
