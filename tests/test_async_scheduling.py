"""Async scheduling (``--async-scheduling``, one step in flight) on CPU: every request gets exactly the
outputs of a synchronous engine (tokens, text, logprobs, finish reasons, usage), through stops, aborts,
preemption, prefix hits, chunked prefill and the P/D hooks, and no KV block is leaked."""

import argparse
import asyncio
import random

import pytest

from common.config import add_arguments, from_args
from common.engine.async_engine import AsyncEngine
from common.engine.config import EngineConfig
from common.engine.engine import LLMEngine
from common.engine.sequence import RemoteRequest
from common.messages import SamplingParams
from tests.test_cuda_graph import RerunGraphs
from tests.test_kv_offload import GREEDY as FIVE_TOKENS, evict_after
from tests.test_engine import copy_blocks, decode_all, demo_path, engine, prefill_remote, prompts, run_pushes  # noqa: F401

ASYNC = {"async_scheduling": True}


def summary(outputs) -> list[tuple]:
    """Everything a client sees of each finished request, but the logprobs' values (``logprob_values``)."""

    def ids(lps):
        return lps and [(lp.token_id, [t for t, _ in lp.top]) for lp in lps]

    return [(o.new_token_ids, o.text, ids(o.logprobs), o.finish_reason, o.usage, o.num_cached_tokens, o.error)
            for o in outputs]  # fmt: skip


def logprob_values(outputs) -> list[float]:
    """Close, not equal: the batches differ in the rows they carry, and CPU matmuls in their rounding."""
    return [v for o in outputs for lp in o.logprobs or [] for v in (lp.logprob, *(v for _, v in lp.top))]


def same_outputs(got, reference) -> bool:
    return summary(got) == summary(reference) and logprob_values(got) == pytest.approx(
        logprob_values(reference), abs=1e-4)


def idle(eng: LLMEngine) -> bool:
    return not eng.has_unfinished() and not eng.launched and eng.block_manager.num_used == 0


def test_default_is_off_on_cpu_and_the_flags_turn_it_on_and_off(demo_path):
    assert not engine(demo_path).async_scheduling
    assert engine(demo_path, **ASYNC).async_scheduling
    parser = argparse.ArgumentParser()
    add_arguments(parser, EngineConfig)
    assert from_args(EngineConfig, parser.parse_args([])).async_scheduling is None  # auto: on with CUDA
    assert from_args(EngineConfig, parser.parse_args(["--async-scheduling"])).async_scheduling is True
    assert from_args(EngineConfig, parser.parse_args(["--no-async-scheduling"])).async_scheduling is False


def test_a_step_stays_in_flight_and_the_next_takes_its_ids_on_the_device(demo_path):
    eng = engine(demo_path, **ASYNC)
    eng.add_request("r", prompts((20,))[0], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert eng.step() == []  # the prefill's first token is still on the device
    seq = eng.requests["r"]
    assert len(eng.launched) == 1 and seq.token_ids[-1] < 0 and eng.has_work()
    first = eng.step()  # launched the step that computes the first token's KV, then processed the prefill
    assert [o.new_token_ids for o in first] == [[seq.token_ids[20]]] and seq.token_ids[20] >= 0
    assert seq.num_computed_tokens == 21 and seq.token_ids[-1] < 0  # the second token: in flight
    outs = first + decode_all(eng)["r"]
    reference = engine(demo_path).generate([seq.token_ids[:20]], seq.sampling)[0]
    assert [t for o in outs for t in o.new_token_ids] == reference.new_token_ids
    assert outs[-1].usage == reference.usage and idle(eng)


def test_a_token_known_to_be_the_last_is_not_computed(demo_path):
    """The 33rd token (the 17th new one, ``max_tokens``) is never an input: its KV would take a third block."""
    eng = engine(demo_path, **ASYNC)
    eng.add_request("r", prompts((16,))[0], SamplingParams(max_tokens=17, temperature=0, ignore_eos=True))
    most = 0
    while eng.has_unfinished():
        eng.step()
        most = max(most, eng.block_manager.num_used)
    assert most == 2 and idle(eng)


def test_a_stopped_request_keeps_its_blocks_until_its_step_in_flight_retires(demo_path):
    eng = engine(demo_path, **ASYNC)
    p = prompts((20,), seed=3)[0]
    free_run = engine(demo_path).generate([p], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    stop = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, stop_token_ids=[free_run.new_token_ids[2]])
    eng.add_request("r", p, stop)
    outs = []
    while not (outs and outs[-1].finished):
        outs += eng.step()
    assert [t for o in outs for t in o.new_token_ids] == free_run.new_token_ids[:3]
    assert outs[-1].usage.completion_tokens == 3 and not eng.requests
    assert eng.launched and eng.block_manager.num_used == 2  # the next step, launched, still writes them
    assert eng.step() == [] and idle(eng)


def test_graph_replay_takes_the_pending_ids_into_its_input_buffer(demo_path):
    ps = prompts((5, 30, 17), seed=4)
    sampling = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    reference = engine(demo_path).generate(ps, sampling)
    eng = LLMEngine(EngineConfig(model=str(demo_path), dtype="float32", device="cpu", num_kv_blocks=64,
                                 max_num_seqs=8, **ASYNC))  # fmt: skip
    eng.runner.graphs = RerunGraphs(eng.model, eng.kv_cache, 8, eng.max_model_len)
    assert summary(eng.generate(ps, sampling)) == summary(reference)
    assert eng.runner.graphs.replays == 12 - 1 and idle(eng)  # every decode step, its inputs pending


def mixed_params(free_run) -> list[SamplingParams]:
    """max_tokens 1..N, stop token ids and strings (taken from a free run), EOS, logprobs, seeded sampling."""
    params = []
    for i, out in enumerate(free_run):
        text = out.text
        params += [
            SamplingParams(max_tokens=1 + i, temperature=0, ignore_eos=True),
            SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop_token_ids=[out.new_token_ids[2 + i]]),
            SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop=[text[len(text) // 2:][:2]]),
            SamplingParams(max_tokens=8, temperature=0, logprobs=2),
            SamplingParams(max_tokens=6, temperature=0.9, top_p=0.9, top_k=30, seed=i, ignore_eos=True, logprobs=1),
        ]
    return params


@pytest.mark.parametrize("overrides", [{}, {"max_num_batched_tokens": 40}], ids=["whole", "chunked"])
def test_mixed_requests_match_the_synchronous_engine(demo_path, overrides):
    ps = prompts((5, 17, 33), seed=21)
    sync, eng = engine(demo_path, num_kv_blocks=255, **overrides), engine(demo_path, **ASYNC, **overrides)
    free_run = sync.generate(ps, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    eng.generate(ps, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # the same prefix cache
    params = mixed_params(free_run)
    batch = [p for p in ps for _ in range(5)]
    got = eng.generate(batch, params)
    assert same_outputs(got, sync.generate(batch, params)) and idle(eng)
    assert sum(o.usage.cached_tokens for o in got) == 5 * sum(len(p) // 16 * 16 for p in ps)  # prefix-cache hits


def test_preemption_in_a_tiny_cache_matches(demo_path):
    ps = prompts((30, 35, 40), seed=3)  # 3 + 4 + 4 blocks at the end: more than the cache's 10
    params = [SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=i, ignore_eos=True) for i in range(2)]
    params += [SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)]
    reference = engine(demo_path, enable_prefix_caching=False).generate(ps, params)
    eng = engine(demo_path, num_kv_blocks=10, enable_prefix_caching=False, **ASYNC)
    before = eng.scheduler.num_preemptions
    assert summary(eng.generate(ps, params)) == summary(reference)
    assert eng.scheduler.num_preemptions > before and idle(eng)


def drive(eng: LLMEngine, ps: list[list[int]], sampling: SamplingParams) -> dict[str, list]:
    """r0, r1 start; r2 joins after 3 steps; r1 is aborted after 6; runs to the end. Outputs by request."""
    outs: dict[str, list] = {}

    def step() -> None:
        for o in eng.step():
            outs.setdefault(o.request_id, []).append(o)

    eng.add_request("r0", ps[0], sampling)
    eng.add_request("r1", ps[1], sampling)
    for _ in range(3):
        step()
    eng.add_request("r2", ps[2], sampling)
    for _ in range(3):
        step()
    assert eng.abort("r1")
    while eng.has_unfinished():
        step()
    return outs


def test_joining_mid_flight_and_abort_mid_decode(demo_path):
    ps = prompts((7, 20, 11), seed=8)
    sampling = SamplingParams(max_tokens=10, temperature=0.7, seed=5, ignore_eos=True)
    reference = drive(engine(demo_path), ps, sampling)
    eng = engine(demo_path, **ASYNC)
    got = drive(eng, ps, sampling)
    for rid in ("r0", "r2"):
        assert summary(got[rid]) == summary(reference[rid])
    # the abort discards the token in flight: what was emitted is a prefix, and usage counts exactly it
    emitted = [t for o in got["r1"] for t in o.new_token_ids]
    full = [t for o in reference["r1"] for t in o.new_token_ids]
    assert emitted == full[: len(emitted)] and got["r1"][-1].finish_reason == "abort"
    assert got["r1"][-1].usage.completion_tokens == len(emitted)
    assert idle(eng)


def test_remote_prefill_and_decode_match_colocated(demo_path):
    ps = prompts((20, 33), seed=6)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=8, temperature=0.8, top_k=20, seed=1234, ignore_eos=True)
    reference = engine(demo_path, enable_prefix_caching=False).generate(ps, [greedy, seeded])
    prefill = engine(demo_path, **ASYNC)
    decode = engine(demo_path, num_kv_blocks=128, **ASYNC)
    for i, (p, sampling) in enumerate(zip(ps, [greedy, seeded])):
        first = prefill_remote(prefill, f"a{i}", p, sampling)
        assert first.finish_reason == "remote_decode" and first.new_token_ids == reference[i].new_token_ids[:1]
        alloc = decode.add_remote_request(RemoteRequest(f"a{i}", p, first.new_token_ids[0], sampling, len(p)))
        copy_blocks(prefill, first.pinned_block_ids, decode, alloc.block_ids[: len(first.pinned_block_ids)])
        decode.finish_remote_kv(f"a{i}", ok=True)
        got = decode_all(decode)[f"a{i}"]
        assert first.new_token_ids + [t for o in got for t in o.new_token_ids] == reference[i].new_token_ids
        assert got[-1].usage == reference[i].usage
        assert prefill.release_transfer(f"t-a{i}")
    assert idle(prefill) and idle(decode)


def test_push_windows_and_pins_match(demo_path):
    ps = prompts((50, 9, 23), seed=5)
    reference = run_pushes(engine(demo_path, max_num_batched_tokens=16), ps)
    eng = engine(demo_path, max_num_batched_tokens=16, **ASYNC)
    recorders, pinned = run_pushes(eng, ps)
    assert {rid: [w[:2] for w in r.windows] for rid, r in recorders.items()} == {
        rid: [w[:2] for w in r.windows] for rid, r in reference[0].items()}
    for rid, recorder in recorders.items():  # reported before the finish pinned the same blocks
        assert recorder.windows[-1][2][: len(pinned[rid])] == pinned[rid]
    assert idle(eng)


def test_an_offloaded_prefix_is_loaded_back_as_synchronously(demo_path):
    eng = LLMEngine(EngineConfig(model=str(demo_path), dtype="float32", device="cpu", num_kv_blocks=12,
                                 kv_offload_cpu_gib=0.01, **ASYNC))  # fmt: skip
    rng = random.Random(1)
    prompt = [rng.randrange(300) for _ in range(64)]
    first = evict_after(eng, prompt, rng)
    again = eng.generate([prompt], FIVE_TOKENS)[0]
    assert again.new_token_ids == first.new_token_ids and again.usage.cached_tokens == 48  # from host memory
    while eng.has_work():  # the last copies to host memory
        eng.step()
    assert idle(eng)


async def test_the_engine_thread_collects_the_step_in_flight(demo_path):
    ps = prompts((9, 25), seed=2)
    sampling = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    reference = engine(demo_path).generate(ps, sampling)
    eng = engine(demo_path, **ASYNC)
    async_engine = AsyncEngine(eng)
    try:
        streams = [async_engine.generate(f"t{i}", p, sampling) for i, p in enumerate(ps)]
        results = await asyncio.wait_for(asyncio.gather(*[collect(s) for s in streams]), 30)
    finally:
        await async_engine.shutdown(timeout=5)
    for outs, ref in zip(results, reference):
        assert [t for o in outs for t in o.new_token_ids] == ref.new_token_ids and outs[-1].usage == ref.usage
    assert idle(eng)


async def collect(stream) -> list:
    return [out async for out in stream if out.new_token_ids or out.finished]


def test_tensor_parallel_steps_synchronously(demo_path):
    ps = prompts((3, 17), seed=1)
    sampling = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    reference = engine(demo_path).generate(ps, sampling)
    eng = LLMEngine(EngineConfig(model=str(demo_path), dtype="float32", device="cpu", num_kv_blocks=64,
                                 tensor_parallel_size=2, **ASYNC))  # fmt: skip
    try:
        assert not eng.async_scheduling  # the ranks get host ids only
        assert summary(eng.generate(ps, sampling)) == summary(reference)
    finally:
        eng.close()
