import pytest

import common.engine.block_manager as block_manager_module
from common.engine.block_manager import BlockManager, hash_block
from common.engine.scheduler import Scheduler
from common.engine.sequence import NoFreeBlocks, Sequence
from common.messages import SamplingParams

BS = 4


def seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams())


def computed(bm: BlockManager, tokens: list[int], rid: str = "r") -> Sequence:
    """A sequence whose whole token list has KV (allocated, 'computed', committed)."""
    s = seq(tokens, rid)
    s.num_computed_tokens = bm.allocate_prefix(s, (len(tokens) - 1) // BS)
    bm.grow(s, len(tokens))
    s.num_computed_tokens = len(tokens)
    bm.commit(s)
    return s


def test_hash_chain_depends_on_prefix():
    a = hash_block((1, 2, 3, 4), 0)
    assert a == hash_block((1, 2, 3, 4), 0)
    assert hash_block((5, 6, 7, 8), a) != hash_block((5, 6, 7, 8), 0)
    assert hash_block((1, 2, 3, 5), 0) != a


def test_refcounts_and_counts_return_to_idle():
    bm = BlockManager(8, BS)
    s = seq(list(range(10)))
    bm.grow(s, 10)
    assert len(s.block_table) == 3 and bm.num_used == 3 and bm.num_free == 5
    assert bm.can_grow(s, 32) and not bm.can_grow(s, 33)
    bm.grow(s, 11)  # still fits in 3 blocks
    assert len(s.block_table) == 3
    bm.free_seq(s)
    assert s.block_table == [] and bm.num_used == 0 and bm.num_free == 8


def test_prefix_hits_via_hash_chain_and_shared_refcount():
    bm = BlockManager(16, BS)
    a = computed(bm, list(range(10)), "a")  # blocks 0,1 full + partial
    b = seq(list(range(8)) + [99, 98, 97], "b")
    hit = bm.allocate_prefix(b, (b.num_tokens - 1) // BS)
    assert hit == 8 and b.block_table == a.block_table[:2]
    assert bm.blocks[a.block_table[0]].ref_count == 2
    # same second block content after a different first block: no hit (chain)
    c = seq([7, 7, 7, 7] + list(range(4, 8)) + [1], "c")
    assert bm.allocate_prefix(c, 2) == 0 and c.block_table == []
    bm.free_seq(a)
    assert bm.num_used == 2  # b still holds the shared prefix
    bm.free_seq(b)
    assert bm.num_used == 0


def test_uncommitted_blocks_are_not_hits():
    bm = BlockManager(8, BS)
    a = seq(list(range(8)), "a")
    bm.grow(a, 8)  # allocated, KV not computed yet
    b = seq(list(range(8)) + [1], "b")
    assert bm.allocate_prefix(b, 2) == 0
    a.num_computed_tokens = 4
    bm.commit(a)  # only the first block has valid KV
    assert bm.allocate_prefix(b, 2) == 4


def test_freed_block_keeps_hash_until_reused():
    bm = BlockManager(4, BS)
    a = computed(bm, list(range(9)), "a")
    first = a.block_table[0]
    bm.free_seq(a)
    assert bm.num_free == 4
    b = seq(list(range(9)), "b")
    assert bm.allocate_prefix(b, 2) == 8 and b.block_table[0] == first
    assert bm.num_free == 2  # the hits left the free list
    bm.free_seq(b)
    # handing every block out as fresh evicts the cached hashes
    c = seq([50] * 16, "c")
    bm.grow(c, 16)
    bm.free_seq(c)
    d = seq(list(range(9)), "d")
    assert bm.allocate_prefix(d, 2) == 0


def test_prefix_caching_disabled():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    computed(bm, list(range(9)), "a")
    b = seq(list(range(9)), "b")
    assert bm.allocate_prefix(b, 2) == 0


def test_pin_unpin_counts():
    bm = BlockManager(8, BS)
    a = computed(bm, list(range(10)), "a")
    blocks = list(a.block_table)
    bm.pin("t1", blocks[:2])
    bm.pin("t2", blocks[1:])
    assert bm.num_pinned == 3
    with pytest.raises(ValueError, match="already pinned"):
        bm.pin("t1", blocks)
    bm.free_seq(a)
    assert bm.num_used == 3 and bm.num_pinned == 3
    assert bm.unpin("t1")
    assert bm.num_pinned == 2 and bm.num_used == 2
    assert not bm.unpin("t1")  # idempotent
    assert bm.unpin("t2")
    assert bm.num_pinned == 0 and bm.num_used == 0 and bm.num_free == 8
    with pytest.raises(ValueError, match="free"):
        bm.pin("t3", [blocks[0]])


def test_remote_allocation_returns_cached_leading_blocks():
    bm = BlockManager(8, BS)
    sched = Scheduler(bm, max_num_batched_tokens=64, max_num_seqs=4)
    local = computed(bm, list(range(8)) + [9], "local")
    remote = seq(list(range(8)) + [5, 6, 7, 8, 1], "remote")  # 13 tokens: room for 14 -> 4 blocks
    alloc = sched.add_remote(remote)
    assert alloc.num_cached_blocks == 2
    assert alloc.block_ids[:2] == local.block_table[:2] and len(alloc.block_ids) == 4
    assert remote.num_cached_tokens == 8
    # a whole-prompt hit is allowed for remote requests (the first token comes from prefill)
    full = seq(list(range(8)), "full")
    assert sched.add_remote(full).num_cached_blocks == 2
    # the blocks being read are not hits until the KV has landed
    probe = seq(list(range(8)) + [5, 6, 7, 8, 0], "probe")
    assert bm.allocate_prefix(probe, 3) == 8
    bm.free_seq(probe)
    sched.finish_remote(remote, kv_valid=True, first_token_id=3)
    assert remote.num_computed_tokens == 13 and remote.token_ids[-1] == 3
    probe = seq(list(range(8)) + [5, 6, 7, 8, 0], "probe")
    assert bm.allocate_prefix(probe, 3) == 8  # landed; registered by the step that first computes for it
    bm.free_seq(probe)
    sched.update(sched.schedule())
    probe = seq(list(range(8)) + [5, 6, 7, 8, 0], "probe")
    assert bm.allocate_prefix(probe, 3) == 12
    bm.free_seq(probe)
    for s in (remote, full):
        sched.finish(s)
    bm.free_seq(local)
    assert bm.num_used == 0


def test_remote_allocation_without_room_holds_nothing():
    bm = BlockManager(3, BS)
    sched = Scheduler(bm, max_num_batched_tokens=64, max_num_seqs=4)
    big = seq(list(range(12)), "big")
    with pytest.raises(NoFreeBlocks, match="needs 4"):
        sched.add_remote(big)
    assert bm.num_used == 0 and not sched.remote


def test_a_prompt_hashed_ahead_is_registered_under_the_same_chain_without_hashing_again(monkeypatch):
    tokens = list(range(1, 15))  # 3 full blocks of 4 and 2 tokens
    plain, ahead = BlockManager(8, BS), BlockManager(8, BS)
    a = computed(plain, tokens, "a")
    b = seq(tokens, "b")
    b.num_prompt_tokens = len(tokens)
    ahead.hash_prompt(b)
    assert b.prompt_hashes == a.block_hashes and len(a.block_hashes) == 3
    calls = []
    monkeypatch.setattr(block_manager_module, "hash_block", lambda *args: calls.append(args) or hash_block(*args))
    ahead.grow(b, len(tokens))
    b.num_computed_tokens = len(tokens)
    ahead.commit(b)
    assert calls == []  # every prompt block's hash came from the chain computed ahead
    assert b.block_hashes == a.block_hashes and ahead.hash_to_block.keys() == plain.hash_to_block.keys()
    hit = seq(tokens + [99], "c")  # a later prompt finds them (its lookup hashes as before: 3 blocks)
    assert ahead.allocate_prefix(hit, 3) == 12 and len(calls) == 3


def test_prompt_hashes_cover_full_prompt_blocks_only_and_not_without_prefix_caching():
    bm = BlockManager(8, BS)
    s = seq(list(range(1, 12)) + [0, 0], "r")  # 11 prompt tokens, then placeholders
    s.num_prompt_tokens = 11
    bm.hash_prompt(s)
    assert len(s.prompt_hashes) == 2  # the third block holds a placeholder: never hashed ahead
    off = seq(list(range(1, 12)), "o")
    off.num_prompt_tokens = 11
    BlockManager(8, BS, enable_prefix_caching=False).hash_prompt(off)
    assert off.prompt_hashes == []
