"""L1: token ranges, status aggregation, leases, config and handshake metadata (no I/O)."""

import random

import msgspec
import pytest
import torch

from common.arith import ceil_div
from common.config import ConfigError
from common.engine.kv_cache import KVCache
from common.kv_transfer.config import KVTransferConfig
from common.kv_transfer.leases import LeaseTable
from common.kv_transfer import ranges
from common.kv_transfer.ranges import BlockPairs, BlockTable, ByteRanges, KVLayout, mapped_ranges, token_ranges
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
                head_dim=8, kv_layout=KVCache.LAYOUT, transfer_backend="mooncake")
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


# -- token ranges -------------------------------------------------------------

LAYERS, HEADS, DIM = 3, 4, 4
BB = 100  # block bytes of the address-only tables below: 4 heads x 5 tokens x 5 bytes


def addresses(ids: list[int], base: int, first_head: int = 0, num_heads: int = HEADS, block_bytes: int = BB
              ) -> BlockTable:
    """A side of 5-token blocks based at ``base``: addresses only, no memory."""
    return BlockTable(KVLayout(base, block_bytes, 64), 5, ids, first_head, num_heads)


def whole_blocks(local: list[int], remote: list[int]) -> ByteRanges:
    """Every head of ``len(local)`` full 5-token blocks, between two engines of the same block size."""
    return token_ranges(addresses(local, 10_000), addresses(remote, 50_000), heads=range(HEADS),
                        num_tokens=5 * len(local))


def test_equal_block_sizes_merge_whole_blocks_consecutive_on_both_sides():
    r = whole_blocks([3, 4, 5, 6], [10, 11, 12, 13])
    assert r == ([10_000 + 3 * BB], [50_000 + 10 * BB], [4 * BB])
    assert r.total_bytes == 4 * BB
    assert whole_blocks([7], [2]) == ([10_000 + 7 * BB], [50_000 + 2 * BB], [BB])


def test_a_run_breaks_when_either_side_breaks():
    assert whole_blocks([0, 1, 2], [5, 6, 9]).lengths == [2 * BB, BB]  # remote jumps after 2
    r = whole_blocks([0, 7, 8], [5, 6, 7])  # local jumps after 1
    assert r.local_addrs == [10_000, 10_000 + 7 * BB]
    assert r.remote_addrs == [50_000 + 5 * BB, 50_000 + 6 * BB]
    assert r.lengths == [BB, 2 * BB]
    # pieces go in local address order: descending ids on both sides still merge
    assert whole_blocks([5, 4], [5, 4]) == ([10_000 + 4 * BB], [50_000 + 4 * BB], [2 * BB])
    assert whole_blocks([5, 4], [4, 5]).lengths == [BB, BB]


def test_nothing_to_read_is_no_range():
    assert token_ranges(addresses([], 0), addresses([], 0), heads=range(HEADS), num_tokens=0) == ([], [], [])
    assert token_ranges(addresses([1, 2], 0), addresses([3, 4], 0), heads=range(HEADS), num_tokens=7,
                        skip_leading=2) == ([], [], [])


def test_a_head_slice_of_equal_block_sizes_is_one_range_per_block():
    """Heads 2..3 of a 4-head prefill into a decode rank holding them: the second half of each block."""
    half = BB // 2
    r = token_ranges(addresses([3, 4], 10_000, first_head=2, num_heads=2, block_bytes=half),
                     addresses([10, 11], 50_000), heads=range(2, 4), num_tokens=10)
    assert r == ([10_000 + 3 * half, 10_000 + 4 * half], [50_000 + 10 * BB + half, 50_000 + 11 * BB + half],
                 [half, half])


def test_byte_offsets_follow_the_cache_layout():
    kv = KVCache(num_blocks=6, num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float16, device="cpu")
    layout = KVLayout.of(kv)
    assert layout.block_bytes == 2 * 2 * 4 * 2 * 8 * 2
    assert layout.region == MemoryRegion(kv.data.data_ptr(), 6 * layout.block_bytes)
    local = BlockTable(layout, 4, [2], 0, 2)
    r = token_ranges(local, BlockTable(KVLayout(0, layout.block_bytes, 1), 4, [0], 0, 2), heads=range(2), num_tokens=4)
    assert r.local_addrs == [kv.block_view(2).data_ptr()]
    one_head = BlockTable(KVLayout(0, layout.block_bytes // 2, 1), 4, [0], 1, 1)
    r = token_ranges(local, one_head, heads=range(1, 2), num_tokens=3)
    assert r == ([kv.block_view(2)[1].data_ptr()], [0], [3 * 2 * 2 * 8 * 2])  # 3 tokens of head 1: 2 layers, K, V


def filled_cache(block_size: int, num_heads: int = HEADS, num_blocks: int = 24, first_value: int = 1) -> KVCache:
    """A cache of ``num_heads`` heads whose every element holds a distinct value (from ``first_value``)."""
    kv = KVCache(num_blocks=num_blocks, num_layers=LAYERS, block_size=block_size, num_kv_heads=num_heads,
                 head_dim=DIM, dtype=torch.float32, device="cpu")
    kv.data.copy_(torch.arange(first_value, first_value + kv.data.numel(), dtype=torch.float32).view(kv.data.shape))
    return kv


def expected_read(decode: KVCache, local: BlockTable, prefill: KVCache, remote: BlockTable, heads: range,
                  first: int, end: int) -> torch.Tensor:
    """``decode.data`` after tokens ``[first, end)`` of ``heads`` were copied from ``prefill``, one token and
    head (every layer, K and V) at a time."""
    out = decode.data.clone()
    for t in range(first, end):
        for h in heads:
            out[local.block_ids[t // local.block_size], h - local.first_head, t % local.block_size] = \
                prefill.data[remote.block_ids[t // remote.block_size], h - remote.first_head, t % remote.block_size]
    return out


def copy_ranges(into: KVCache, source: KVCache, r: ByteRanges) -> None:
    """What a backend read does, on two caches whose layouts are based at 0."""
    dst, src = into.data.view(-1).view(torch.uint8), source.data.view(-1).view(torch.uint8)
    for la, ra, n in zip(*r):
        dst[la:la + n] = src[ra:ra + n]


def blocks_of(kv: KVCache, block_ids: list[int], first_head: int = 0) -> BlockTable:
    return BlockTable(KVLayout(0, kv.block_bytes, kv.num_blocks), kv.block_size, block_ids, first_head, kv.num_kv_heads)


def scattered(n: int, seed: int, num_blocks: int = 24) -> list[int]:
    """``n`` distinct block ids, some in consecutive runs, as a block manager leaves them."""
    ids = list(range(num_blocks))
    random.Random(seed).shuffle(ids)
    return sorted(ids[:n], key=lambda b: (b // 3, b))


def check_read(remote_size: int, local_size: int, num_tokens: int, skip_leading: int, remote_heads: range,
               local_heads: range, heads: range) -> ByteRanges:
    """Reads ``heads`` between caches holding ``remote_heads`` / ``local_heads`` and checks every byte against
    the per-element reference: the tokens decode lacks arrive, nothing else changes."""
    remote_ids = scattered(ceil_div(num_tokens, remote_size), seed=num_tokens)
    local_ids = scattered(ceil_div(num_tokens, local_size), seed=num_tokens + 1)
    skip_leading = min(skip_leading, len(local_ids))
    prefill = filled_cache(remote_size, len(remote_heads))
    decode = filled_cache(local_size, len(local_heads), first_value=1 + prefill.data.numel())
    local, remote = blocks_of(decode, local_ids, local_heads.start), blocks_of(prefill, remote_ids, remote_heads.start)
    first = min(skip_leading * local_size, num_tokens)
    expected = expected_read(decode, local, prefill, remote, heads, first, num_tokens)
    r = token_ranges(local, remote, heads=heads, num_tokens=num_tokens, skip_leading=skip_leading)
    copy_ranges(decode, prefill, r)
    assert torch.equal(decode.data, expected)
    assert r.total_bytes == (num_tokens - first) * len(heads) * LAYERS * 2 * DIM * 4
    return r


@pytest.mark.parametrize("remote_size, local_size", [(4, 8), (8, 4), (4, 16), (16, 4), (8, 8)])
@pytest.mark.parametrize("num_tokens", [1, 3, 4, 8, 13, 16, 31, 32, 47])
@pytest.mark.parametrize("skip_leading", [0, 1, 2])
def test_every_head_reads_exactly_the_tokens_decode_lacks(remote_size, local_size, num_tokens, skip_leading):
    check_read(remote_size, local_size, num_tokens, skip_leading, range(HEADS), range(HEADS), range(HEADS))


@pytest.mark.parametrize(
    "remote_heads, local_heads, heads",
    [(range(4), range(0, 2), range(0, 2)),  # prefill TP 1 -> decode TP 2, rank 0
     (range(4), range(2, 4), range(2, 4)),  # ... rank 1
     (range(0, 2), range(4), range(0, 2)),  # prefill TP 2 -> decode TP 1, from rank 0
     (range(2, 4), range(4), range(2, 4)),  # ... from rank 1
     (range(2, 4), range(2, 4), range(2, 4)),  # TP 2 -> TP 2, rank 1
     (range(1, 2), range(1, 2), range(1, 2)),  # KV heads replicated (TP > heads): one head on both sides
     (range(4), range(3, 4), range(3, 4)),  # ... one head from a prefill holding every head
     (range(1, 4), range(0, 3), range(1, 3))],  # a part of both sides' heads
)
@pytest.mark.parametrize("remote_size, local_size", [(8, 8), (4, 8), (8, 4)])
@pytest.mark.parametrize("num_tokens, skip_leading", [(5, 0), (16, 0), (16, 1), (21, 1), (21, 2)])
def test_a_head_slice_reads_exactly_its_heads(remote_heads, local_heads, heads, remote_size, local_size, num_tokens,
                                             skip_leading):
    check_read(remote_size, local_size, num_tokens, skip_leading, remote_heads, local_heads, heads)



@pytest.mark.parametrize("seed", range(40))
def test_equal_block_sizes_give_the_ranges_of_the_general_mapping(seed):
    """One block size on both sides is planned without numpy: the same ranges as the mapping of any sizes,
    for scattered ids, head slices, prefix hits and windows starting inside a block."""
    rng = random.Random(seed)
    size, token_bytes = rng.choice([1, 4, 16]), 8
    num_tokens = rng.randrange(1, 6 * size)
    blocks = ceil_div(num_tokens, size)
    local_heads, remote_heads = range(rng.randrange(3), 4), range(rng.randrange(3), 4)
    first = max(local_heads.start, remote_heads.start)
    heads = range(first, rng.randrange(first, 4) + 1)
    def table(side_heads: range, base: int) -> BlockTable:
        layout = KVLayout(base, len(side_heads) * size * token_bytes, 32)
        return BlockTable(layout, size, scattered(blocks, rng.randrange(99), 32), side_heads.start, len(side_heads))
    local, remote = table(local_heads, 1 << 20), table(remote_heads, 1 << 30)
    begin = rng.choice([min(rng.randrange(blocks + 1) * size, num_tokens), rng.randrange(num_tokens + 1)])
    fast = token_ranges(local, remote, heads=heads, num_tokens=num_tokens, first_token=begin)
    assert fast == mapped_ranges(local, remote, heads, begin, num_tokens, token_bytes)
    assert fast.total_bytes == (num_tokens - begin) * len(heads) * token_bytes

@pytest.mark.parametrize("seed", range(20))
def test_whole_blocks_of_every_head_in_runs_give_the_ranges_of_the_general_mapping(seed):
    """Every head on both sides: runs of consecutive ids on both sides are found as runs (not block by block),
    with the same ranges as the mapping of any sizes, windows starting or ending inside a block included."""
    rng = random.Random(seed)
    size, token_bytes, heads = rng.choice([2, 16]), 8, range(2)
    num_tokens = rng.randrange(1, 40 * size)
    blocks = ceil_div(num_tokens, size)
    def table(base: int) -> BlockTable:
        runs = [list(range(s, s + rng.randrange(1, 9))) for s in range(0, 8 * 64, 8)]
        rng.shuffle(runs)
        ids = [b for run in runs for b in run][:blocks]
        return BlockTable(KVLayout(base, len(heads) * size * token_bytes, 8 * 64), size, ids, 0, len(heads))
    local, remote = table(1 << 20), table(1 << 30)
    begin = rng.choice([0, rng.randrange(num_tokens + 1)])
    fast = token_ranges(local, remote, heads=heads, num_tokens=num_tokens, first_token=begin)
    assert fast == mapped_ranges(local, remote, heads, begin, num_tokens, token_bytes)


@pytest.mark.parametrize("seed", range(30))
def test_whole_blocks_move_exactly_the_bytes_of_token_ranges(seed):
    """Where a read is whole blocks (one block size, the same heads on both sides), ``whole_blocks``' ids and
    tail copy the same bytes between the same addresses as ``token_ranges``, prefix hits and a last block the
    prompt ends inside included; statuses map back one per block and per tail range."""
    rng = random.Random(seed)
    size, token_bytes, heads = rng.choice([1, 4, 16]), 8, range(rng.randrange(1, 3))
    num_tokens = rng.randrange(0, 9 * size)
    blocks = ceil_div(num_tokens, size)
    local, remote = (BlockTable(KVLayout(base, len(heads) * size * token_bytes, 32), size,
                                scattered(blocks, rng.randrange(99), 32), 0, len(heads)) for base in (1 << 20, 1 << 30))
    skip = rng.randrange(blocks + 1)
    pairs = ranges.whole_blocks(local, remote, heads=heads, num_tokens=num_tokens, skip_leading=skip)
    expected = token_ranges(local, remote, heads=heads, num_tokens=num_tokens, skip_leading=skip)
    byte_ranges, per_range = pairs.byte_ranges()
    assert _same_bytes(byte_ranges, expected)
    assert pairs.total_bytes == expected.total_bytes == byte_ranges.total_bytes
    assert sum(per_range) == pairs.count == len(pairs.local_ids) + pairs.tail.count
    assert pairs.tail.total_bytes == (num_tokens % size if blocks > max(skip, num_tokens // size) else 0) \
        * len(heads) * token_bytes
    if per_range:  # the last range failed: the blocks or tail range it stands for
        statuses = [S] * (len(per_range) - 1) + [F]
        assert BlockPairs.block_statuses(statuses, per_range) == [S] * (pairs.count - per_range[-1]) + [F] * per_range[-1]


def _same_bytes(a: ByteRanges, b: ByteRanges) -> bool:
    """Whether two range lists copy the same (local, remote) byte pairs, however they are cut."""
    def pairs(r: ByteRanges) -> set[tuple[int, int]]:
        return {(la + i, ra + i) for la, ra, n in zip(*r) for i in range(0, n, 8)}
    return pairs(a) == pairs(b)


def test_reads_that_are_not_whole_blocks_are_planned_as_ranges():
    """A head slice of a side holding more heads, or two block sizes: ``whole_blocks`` declines."""
    half = BB // 2
    one_head = addresses([3, 4], 10_000, first_head=2, num_heads=2, block_bytes=half)
    assert ranges.whole_blocks(one_head, addresses([7, 8], 50_000), heads=range(2, 4), num_tokens=10) is None
    other_size = BlockTable(KVLayout(0, 2 * BB, 64), 10, [1], 0, HEADS)
    assert ranges.whole_blocks(other_size, addresses([7, 8], 50_000), heads=range(HEADS), num_tokens=10) is None
    with pytest.raises(ValueError, match="duplicate local block ids"):
        ranges.whole_blocks(addresses([3, 3], 0), addresses([7, 8], 0), heads=range(HEADS), num_tokens=10)


def test_a_window_of_block_pairs_counts_blocks_then_tail_ranges():
    pairs = BlockPairs(0, 0, 4, [1, 2, 3], [4, 5, 6], ByteRanges([40, 48], [80, 88], [2, 2]))
    assert pairs.window(0, 2) == BlockPairs(0, 0, 4, [1, 2], [4, 5], ByteRanges([], [], []))
    assert pairs.window(2, 4) == BlockPairs(0, 0, 4, [3], [6], ByteRanges([40], [80], [2]))
    assert pairs.window(4, 9) == BlockPairs(0, 0, 4, [], [], ByteRanges([48], [88], [2]))
    assert [w.count for w in (pairs.window(0, 2), pairs.window(2, 4), pairs.window(4, 9))] == [2, 2, 1]


def llama_1b(block_size: int, heads: range) -> BlockTable:
    """A Llama-3.2-1B-shaped side (16 layers, 64 head_dim, fp16) holding ``heads``, a 2,048-token prompt in
    consecutive blocks."""
    block_bytes = len(heads) * block_size * 16 * 2 * 64 * 2
    return BlockTable(KVLayout(1 << 20, block_bytes, 200), block_size, list(range(10, 10 + 2048 // block_size)),
                      heads.start, len(heads))


@pytest.mark.parametrize(
    "remote, local, heads, expected",
    [((16, range(8)), (16, range(8)), range(8), 1),  # homogeneous: one range
     ((16, range(8)), (16, range(4)), range(4), 128),  # p=1 -> d=2: one range per block
     ((16, range(4, 8)), (16, range(8)), range(4, 8), 128),  # p=2 -> d=1, from one prefill rank
     # 16 -> 32: a piece per head and 16 tokens (1,024), merged across every local block boundary (63)
     ((16, range(8)), (32, range(8)), range(8), 1024 - 63),
     ((32, range(8)), (16, range(8)), range(8), 1024 - 63),  # ... merged across every other local boundary
     ((16, range(8)), (32, range(4)), range(4), 512)],  # p=1 -> d=2 and 16 -> 32: no merge
)
def test_ranges_per_request_merge_what_is_contiguous_on_both_sides(remote, local, heads, expected):
    r = token_ranges(llama_1b(*local), llama_1b(*remote), heads=heads, num_tokens=2048)
    assert len(r.lengths) == expected
    assert r.total_bytes == 2048 * len(heads) * 16 * 2 * 64 * 2


@pytest.mark.parametrize(
    "local_ids, remote_ids, over, match",
    [([0], [0, 1], {}, "1 local blocks of 8 tokens for 9 tokens \\(need 2\\)"),
     ([0, 1], [0, 1], {}, "2 remote blocks of 4 tokens for 9 tokens \\(need 3\\)"),
     ([0, 1], [0, 1, 24], {}, "remote block id 24"),
     ([0, 24], [0, 1, 2], {}, "local block id 24"),
     ([0, 1], [0, 1, -1], {}, "remote block id -1"),
     ([3, 3], [0, 1, 2], {}, "duplicate local"),
     ([0, 1], [0, 1, 2], {"skip_leading": 3}, "skip_leading=3"),
     ([0, 1], [0, 1, 2], {"heads": range(1, 5)}, "not a non-empty contiguous range"),
     ([0, 1], [0, 1, 2], {"heads": range(2, 2)}, "not a non-empty contiguous range"),
     ([0, 1], [0, 1, 2], {"heads": range(0, 4, 2)}, "not a non-empty contiguous range")],
)
def test_token_ranges_refuse_what_does_not_fit(local_ids, remote_ids, over, match):
    decode, prefill = filled_cache(8, num_blocks=4), filled_cache(4)
    with pytest.raises(ValueError, match=match):
        token_ranges(blocks_of(decode, local_ids), blocks_of(prefill, remote_ids),
                     **{"heads": range(HEADS), "num_tokens": 9, **over})


def test_token_ranges_refuse_heads_outside_either_side():
    decode, prefill = filled_cache(8, num_heads=2), filled_cache(8, num_heads=2)
    local, remote = blocks_of(decode, [0], first_head=2), blocks_of(prefill, [0], first_head=1)
    token_ranges(local, remote, heads=range(2, 3), num_tokens=8)
    with pytest.raises(ValueError, match="within local heads range\\(2, 4\\) and remote heads range\\(1, 3\\)"):
        token_ranges(local, remote, heads=range(2, 4), num_tokens=8)
    with pytest.raises(ValueError, match="not a non-empty contiguous range"):
        token_ranges(local, remote, heads=range(1, 3), num_tokens=8)


def test_token_ranges_refuse_different_token_sizes():
    decode = filled_cache(8)
    wide = BlockTable(KVLayout(0, 2 * filled_cache(4).block_bytes, 24), 4, [0, 1, 2], 0, HEADS)
    with pytest.raises(ValueError, match="bytes per token and head locally"):
        token_ranges(blocks_of(decode, [0, 1]), wide, heads=range(HEADS), num_tokens=9)
    odd = BlockTable(KVLayout(0, filled_cache(4).block_bytes, 24), 4, [0, 1, 2], 0, 5)  # 4 heads' bytes, 5 heads
    with pytest.raises(ValueError, match="do not hold 5 heads of 4 tokens"):
        token_ranges(blocks_of(decode, [0, 1]), odd, heads=range(HEADS), num_tokens=9)


def test_token_ranges_refuse_block_sizes_that_do_not_divide():
    decode, prefill = filled_cache(8), filled_cache(12)
    with pytest.raises(ValueError, match="block sizes 8 and 12: neither divides the other"):
        token_ranges(blocks_of(decode, [0, 1]), blocks_of(prefill, [0, 1]), heads=range(HEADS), num_tokens=16)


@pytest.mark.parametrize("local_bs,remote_bs", [(4, 4), (4, 8), (8, 2)])
@pytest.mark.parametrize("first_token", [0, 3, 5, 8, 13])
def test_first_token_windows_tile_the_whole_prompt(local_bs, remote_bs, first_token):
    """Push mode writes a prompt chunk by chunk: the windows [0, a), [a, n) move exactly the bytes of [0, n)."""
    n, heads, token_bytes = 14, 2, 8
    def table(bs: int, base: int) -> BlockTable:
        ids = list(range(ceil_div(n, bs)))[::-1]
        return BlockTable(KVLayout(base, bs * heads * token_bytes, 16), bs, ids, 0, heads)
    local, remote = table(local_bs, 1 << 20), table(remote_bs, 1 << 30)

    def pieces(r: ByteRanges) -> set[tuple[int, int]]:
        return {(la + i, ra + i) for la, ra, length in zip(*r) for i in range(length)}

    whole = pieces(token_ranges(local, remote, heads=range(heads), num_tokens=n))
    head = token_ranges(BlockTable(local.layout, local_bs, local.block_ids[:ceil_div(first_token, local_bs)], 0,
                                   heads),
                        BlockTable(remote.layout, remote_bs, remote.block_ids[:ceil_div(first_token, remote_bs)], 0,
                                   heads), heads=range(heads), num_tokens=first_token) if first_token else None
    tail = token_ranges(local, remote, heads=range(heads), num_tokens=n, first_token=first_token)
    got = pieces(tail) | (pieces(head) if head else set())
    assert got == whole and not (head and pieces(head) & pieces(tail))


@pytest.mark.parametrize("local_size, remote_size", [(16, 16), (16, 32), (32, 16)])
def test_nothing_left_to_read_gives_no_range_not_an_empty_one(local_size, remote_size):
    """From ``first_token == num_tokens`` off a block boundary nothing is read: a zero-length range would be
    refused by every backend (``check_batch``)."""
    token_bytes = 64

    def table(size: int, base: int) -> BlockTable:
        return BlockTable(KVLayout(base, size * token_bytes, 8), size, [3, 1][: ceil_div(21, size)], 0, 1)

    local, remote = table(local_size, 1 << 20), table(remote_size, 1 << 30)
    assert token_ranges(local, remote, heads=range(1), num_tokens=21, first_token=21) == ByteRanges([], [], [])
