"""The CPU offload tier: host pool LRU, block ownership while a copy runs, and evicted prefixes
loaded back into a real engine (tokens identical to recomputing them)."""

import random

import pytest
import torch

from common.config import ConfigError
from common.engine.config import EngineConfig
from common.engine.engine import LLMEngine
from common.engine.loader import resolve_model_path
from common.engine.model_config import load_model_config
from common.engine.model_runner import StepInputs
from common.kv_offload.host_pool import HostPool
from common.kv_offload.tier import OffloadOps, host_slots
from common.messages import SamplingParams

GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
TOKENS = (1, 2, 3)


def test_an_entry_is_a_hit_only_once_its_copy_finished():
    pool = HostPool(2)
    slot = pool.reserve(7, TOKENS)
    assert pool.lookup(7, TOKENS) is None  # still being copied in
    pool.mark_ready([slot])
    assert pool.lookup(7, TOKENS) == slot
    assert pool.lookup(7, (9, 9, 9)) is None  # same hash, other tokens: a collision, not a hit
    assert pool.reserve(7, TOKENS) is None  # already held


def test_the_least_recently_used_ready_entry_is_evicted():
    pool = HostPool(2)
    a, b = pool.reserve(1, TOKENS), pool.reserve(2, TOKENS)
    pool.mark_ready([a, b])
    assert pool.lookup(1, TOKENS) == a  # 2 is now the least recently used
    assert pool.reserve(3, TOKENS) == b
    assert 2 not in pool and 1 in pool and 3 in pool


def test_a_slot_being_copied_into_is_never_evicted():
    pool = HostPool(2)
    a = pool.reserve(1, TOKENS)
    pool.reserve(2, TOKENS)
    assert pool.reserve(3, TOKENS) is None  # both copies still running
    pool.mark_ready([a])
    assert pool.reserve(3, TOKENS) == a and 1 not in pool


def test_bad_offload_sizes_are_refused():
    with pytest.raises(ConfigError, match="must be >= 0"):
        EngineConfig(kv_offload_cpu_gib=-1.0).validate()
    with pytest.raises(ConfigError, match="needs --enable-prefix-caching"):
        EngineConfig(kv_offload_cpu_gib=1.0, enable_prefix_caching=False).validate()
    demo = load_model_config(resolve_model_path("demo"))
    with pytest.raises(ConfigError, match="holds no KV block"):
        host_slots(EngineConfig(kv_offload_cpu_gib=1e-9), demo, torch.float32)
    assert host_slots(EngineConfig(kv_offload_cpu_gib=1.0), demo, torch.float32) == 2**30 // (4 * 2 * 16 * 4 * 32 * 4)


def test_step_inputs_carry_the_offload_copies_to_other_ranks():
    ops = OffloadOps(loads=[(3, 1), (4, 2)], stores=[(0, 9)])
    inputs = StepInputs([5, 6, 7, 9], [0, 1, 2, 40], [3, 1], [3, 41], [[4], [7, 1, 0]], [False, True], ops)
    assert StepInputs.unpack(inputs.pack()) == inputs


def small_engine(gib: float) -> LLMEngine:
    """12 blocks of 16 tokens: one 100-token prompt evicts most of what an earlier one left cached."""
    return LLMEngine(EngineConfig(model="demo", dtype="float32", device="cpu", num_kv_blocks=12,
                                  kv_offload_cpu_gib=gib))


@pytest.fixture(scope="module")
def offload_engine():
    return small_engine(0.01)


def evict_after(eng: LLMEngine, prompt: list[int], rng: random.Random):
    """Run ``prompt``, then other prompts until none of its blocks is left in device memory (a
    ``small_engine``); returns the output of ``prompt``."""
    first = eng.generate([prompt], GREEDY)[0]
    for _ in range(3):
        eng.generate([[rng.randrange(300) for _ in range(100)]], GREEDY)
    return first


@pytest.mark.parametrize("gib, cached", [(0.0, 0), (0.01, 48)])
def test_an_evicted_prefix_is_loaded_back_from_host_memory(gib, cached, offload_engine):
    eng = offload_engine if gib else small_engine(gib)
    rng = random.Random(1)
    prompt = [rng.randrange(300) for _ in range(64)]
    first = evict_after(eng, prompt, rng)
    again = eng.generate([prompt], GREEDY)[0]
    assert again.new_token_ids == first.new_token_ids
    assert again.usage.cached_tokens == again.num_cached_tokens == cached  # 3 full blocks; the 4th is recomputed


def test_a_block_is_not_handed_out_while_its_copy_to_host_runs(offload_engine):
    eng = offload_engine
    prompt = [random.Random(2).randrange(300) for _ in range(40)]
    eng.generate([prompt], GREEDY)
    bm, tier = eng.block_manager, eng.offload
    held = [block for _, block in tier.queued.stores]
    assert len(held) == 2  # the prompt's two full blocks, freed when it finished
    assert all(bm.blocks[b].ref_count == 1 and b not in bm.free for b in held)
    assert eng.has_work()
    eng.step()  # starts the copies
    assert [b for _, b in tier.in_flight] == held and not any(b in bm.free for b in held)
    eng.step()  # a step later every rank finished them: the tier releases the blocks, the entries are hits
    assert all(b in bm.free for b in held) and not eng.has_work()
    assert bm.num_used == 0


def test_under_tensor_parallelism_every_rank_offloads_and_loads_its_heads(offload_engine):
    rng = random.Random(6)
    prompt = [rng.randrange(300) for _ in range(64)]
    reference = offload_engine.generate([prompt], GREEDY)[0].new_token_ids
    eng = LLMEngine(EngineConfig(model="demo", dtype="float32", device="cpu", num_kv_blocks=12,
                                 kv_offload_cpu_gib=0.01, tensor_parallel_size=2))
    try:
        assert evict_after(eng, prompt, rng).new_token_ids == reference
        again = eng.generate([prompt], GREEDY)[0]
        assert again.usage.cached_tokens == 48 and again.new_token_ids == reference
        while eng.has_work():  # copy-only steps: every rank finishes its copies (a barrier), then the blocks free
            eng.step()
        assert eng.block_manager.num_used == 0
    finally:
        eng.close()
