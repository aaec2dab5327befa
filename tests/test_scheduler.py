"""The scheduler's rule without a model: a fake step appends token 0 to sequences that reached the end."""

from common.engine.block_manager import BlockManager
from common.engine.scheduler import Scheduler
from common.engine.sequence import Sequence, SequenceStatus
from common.messages import SamplingParams

BS = 4


def make(num_blocks=64, budget=32, max_seqs=8, prefix_caching=True) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS, prefix_caching), budget, max_seqs)


def seq(rid: str, n: int, first: int = 0) -> Sequence:
    return Sequence(rid, list(range(first, first + n)), SamplingParams())


def step(sched: Scheduler) -> list[tuple[str, int]]:
    scheduled = sched.schedule()
    done = [s for s, n in scheduled if s.num_computed_tokens + n == s.num_tokens]
    sched.update(scheduled)
    for s in done:
        s.token_ids.append(0)
    return [(s.request_id, n) for s, n in scheduled]


def test_chunked_prefill_under_the_token_budget():
    sched = make(budget=32)
    sched.add(seq("a", 40))
    sched.add(seq("b", 40, first=100))
    assert step(sched) == [("a", 32)]
    assert step(sched) == [("a", 8), ("b", 24)]  # a samples its first token here
    assert step(sched) == [("a", 1), ("b", 16)]  # running first: a decodes, b finishes its prompt
    assert step(sched) == [("a", 1), ("b", 1)]


def test_max_num_seqs():
    sched = make(max_seqs=2)
    for i in range(3):
        sched.add(seq(f"r{i}", 5, first=10 * i))
    assert [r for r, _ in step(sched)] == ["r0", "r1"]
    assert [s.request_id for s in sched.waiting] == ["r2"]
    sched.finish(sched.running[0])
    assert [r for r, _ in step(sched)] == ["r1", "r2"]


def test_preemption_takes_the_newest_and_recomputes():
    sched = make(num_blocks=4, budget=64, prefix_caching=False)
    sched.add(seq("old", 8))
    sched.add(seq("new", 8, first=50))
    assert step(sched) == [("old", 8), ("new", 8)]  # 2 blocks each; both now at 9 tokens
    assert step(sched) == [("old", 1)]  # "old" needs a 3rd block: "new" is preempted
    new = sched.waiting[0]
    assert new.request_id == "new" and new.status is SequenceStatus.WAITING
    assert new.num_computed_tokens == 0 and new.block_table == [] and sched.num_preemptions == 1
    assert new.token_ids[-1] == 0 and new.num_tokens == 9  # its sampled token is kept, recomputed later
    sched.finish(sched.running[0])
    assert step(sched) == [("new", 9)]


def test_a_lone_sequence_without_blocks_preempts_itself_and_waits():
    sched = make(num_blocks=2, prefix_caching=False)
    sched.add(seq("a", 8))
    assert step(sched) == [("a", 8)]
    assert step(sched) == []  # needs a 3rd block: preempted, cannot be readmitted
    assert sched.waiting[0].request_id == "a" and sched.block_manager.num_used == 0


def test_prefix_hits_skip_computed_tokens():
    sched = make()
    sched.add(seq("a", 12))
    step(sched)
    sched.finish(sched.running[0])
    sched.add(seq("b", 14))
    assert step(sched) == [("b", 2)]  # a's 3 full blocks (12 tokens) are hits
    assert sched.running[0].num_cached_tokens == 12
    sched.add(seq("c", 12))
    assert step(sched) == [("b", 1), ("c", 4)]  # a whole-prompt hit still computes its last block's tokens


def test_remote_sequences_are_not_scheduled_until_their_kv_lands():
    sched = make()
    sched.add(seq("local", 6, first=200))
    remote = seq("remote", 10)
    alloc = sched.add_remote(remote)
    assert alloc.num_cached_blocks == 0 and len(alloc.block_ids) == 3
    for _ in range(3):
        assert [r for r, _ in step(sched)] == ["local"]
    assert remote.num_computed_tokens == 0
    sched.finish_remote(remote, kv_valid=True, first_token_id=42)
    assert remote.token_ids[-1] == 42 and remote.num_output_tokens == 1
    assert step(sched) == [("local", 1), ("remote", 1)]  # only the first token is computed


def test_failed_remote_kv_recomputes_past_the_prefix_hits():
    sched = make()
    sched.add(seq("warm", 9))
    step(sched)
    sched.finish(sched.running[0])
    remote = seq("remote", 10)
    alloc = sched.add_remote(remote)
    assert alloc.num_cached_blocks == 2
    sched.finish_remote(remote, kv_valid=False, first_token_id=42)
    assert step(sched) == [("remote", 3)]  # tokens 8, 9 and the first token


def test_finish_frees_blocks_at_every_stage():
    sched = make(budget=8)
    bm = sched.block_manager
    waiting, chunked, remote = seq("w", 20, first=300), seq("c", 20), seq("r", 20, first=100)
    sched.add(chunked)
    step(sched)  # 8 of 20 computed
    sched.add(waiting)
    sched.add_remote(remote)
    assert chunked.status is SequenceStatus.RUNNING and bm.num_used > 0
    for s in (waiting, chunked, remote):
        sched.finish(s)
        assert s.status is SequenceStatus.FINISHED and s.block_table == []
    assert bm.num_used == 0 and not (sched.waiting or sched.running or sched.remote)
