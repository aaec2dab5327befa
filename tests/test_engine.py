"""LLMEngine end to end on tiny CPU models: batching, prefix caching, preemption, chunked
prefill and the P/D hooks all give the tokens of a plain greedy run (and of transformers)."""

import asyncio
import random
import shutil
import threading

import pytest
import torch

from common.arith import ceil_div
from common.config import ConfigError
from common.engine.async_engine import AsyncEngine, EngineDead
from common.engine.config import EngineConfig
from common.engine.engine import LLMEngine
from common.engine.loader import resolve_model_path
from common.engine.sequence import InvalidRequest, RemoteRequest
from common.messages import SamplingParams
from tests.procs import eventually

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
LENGTHS = (3, 16, 17, 40, 71)


@pytest.fixture(scope="module")
def demo_path():
    return resolve_model_path("demo")


@pytest.fixture(scope="module")
def hf_llama_path(tmp_path_factory, demo_path):
    """A tiny random Llama written by transformers itself, with the demo tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=336, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=333, eos_token_id=334,
        rope_theta=10000.0, tie_word_embeddings=True,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("hf-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_path / name, path / name)
    return path


_engines: dict[tuple, LLMEngine] = {}


def engine(model, **overrides) -> LLMEngine:
    """An idle engine (cached per config: model loading dominates the test time)."""
    kwargs = {"model": str(model), "dtype": "float32", "device": "cpu", "num_kv_blocks": 256, **overrides}
    key = tuple(sorted(kwargs.items()))
    if key not in _engines:
        _engines[key] = LLMEngine(EngineConfig(**kwargs))
    eng = _engines[key]
    assert not eng.has_unfinished() and eng.block_manager.num_used == 0
    return eng


def prompts(lengths=LENGTHS, seed=0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 330) for _ in range(n)] for n in lengths]


def tokens(outputs) -> list[list[int]]:
    return [o.new_token_ids for o in outputs]


def one_at_a_time(eng, ps, sampling=GREEDY):
    return [eng.generate([p], sampling)[0].new_token_ids for p in ps]


def hf_greedy(path, ps, max_new_tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    for p in ps:
        ids = torch.tensor([p])
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
        out.append(gen[0, len(p):].tolist())
    return out


@pytest.mark.parametrize("model", ["demo", "hf_llama"])
def test_greedy_matches_transformers_and_batching(model, request):
    path = request.getfixturevalue(f"{model}_path")
    ps = prompts()
    eng = engine(path, enable_prefix_caching=False)
    batched = eng.generate(ps, GREEDY)
    assert all(o.finish_reason == "length" and len(o.new_token_ids) == 10 for o in batched)
    assert tokens(batched) == one_at_a_time(eng, ps)
    assert tokens(batched) == hf_greedy(path, ps, 10)
    assert eng.block_manager.num_used == 0


@pytest.mark.parametrize("model", ["demo", "hf_llama"])
def test_prefix_cache_hits_give_identical_output(model, request):
    path = request.getfixturevalue(f"{model}_path")
    shared = prompts((40,), seed=1)[0]
    ps = [shared + tail for tail in prompts((1, 9, 20), seed=2)]
    reference = tokens(engine(path, enable_prefix_caching=False).generate(ps, GREEDY))
    eng = engine(path)
    first = eng.generate(ps[:1], GREEDY)[0]
    rest = eng.generate(ps[1:], GREEDY)
    assert [first.new_token_ids] + tokens(rest) == reference
    assert first.usage.cached_tokens == 0
    assert [o.usage.cached_tokens for o in rest] == [32, 32]
    assert all(o.num_cached_tokens == o.usage.cached_tokens for o in rest)
    again = eng.generate(ps[:1], GREEDY)[0]  # whole prompt cached except the last token
    assert again.new_token_ids == reference[0] and again.usage.cached_tokens == 32


@pytest.mark.parametrize("model", ["demo", "hf_llama"])
def test_preemption_gives_identical_output(model, request):
    path = request.getfixturevalue(f"{model}_path")
    ps = prompts((30, 35, 40, 45), seed=3)
    sampling = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    reference = tokens(engine(path, enable_prefix_caching=False).generate(ps, sampling))
    eng = engine(path, num_kv_blocks=10, enable_prefix_caching=False)  # 4 blocks per sequence at the end
    before = eng.scheduler.num_preemptions
    assert tokens(eng.generate(ps, sampling)) == reference
    assert eng.scheduler.num_preemptions > before
    assert eng.block_manager.num_used == 0


def test_seeded_sampling_survives_preemption(demo_path):
    ps = prompts((30, 35, 40, 45), seed=4)
    sampling = [SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=i, ignore_eos=True) for i in range(4)]
    reference = tokens(engine(demo_path).generate(ps, sampling))
    eng = engine(demo_path, num_kv_blocks=10, enable_prefix_caching=False)
    assert tokens(eng.generate(ps, sampling)) == reference


@pytest.mark.parametrize("model", ["demo", "hf_llama"])
def test_chunked_prefill_gives_identical_output(model, request):
    path = request.getfixturevalue(f"{model}_path")
    ps = prompts()
    reference = tokens(engine(path, enable_prefix_caching=False).generate(ps, GREEDY))
    eng = engine(path, max_num_batched_tokens=8, enable_prefix_caching=False)
    assert tokens(eng.generate(ps, GREEDY)) == reference


def test_max_num_seqs_limits_the_batch(demo_path):
    eng = engine(demo_path, max_num_seqs=2, enable_prefix_caching=False)
    for i, p in enumerate(prompts()):
        eng.add_request(f"r{i}", p, GREEDY)
    eng.step()
    assert eng.stats().running == 2 and eng.stats().waiting == 3
    while eng.has_unfinished():
        eng.step()
        assert eng.stats().running <= 2


def test_stop_conditions(demo_path):
    eng = engine(demo_path)
    p = prompts((12,), seed=5)[0]
    free_run = eng.generate([p], GREEDY)[0]
    # a stop token id ends the request at its first occurrence, included in the token ids
    stop_id = free_run.new_token_ids[3]
    out = eng.generate([p], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, stop_token_ids=[stop_id]))[0]
    k = free_run.new_token_ids.index(stop_id)
    assert out.finish_reason == "stop" and out.new_token_ids == free_run.new_token_ids[: k + 1]
    # EOS stops unless ignore_eos
    eos = next(iter(eng.eos_token_ids))
    with_eos = eng.generate([p], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[]))[0]
    assert with_eos.finish_reason in ("stop", "length")
    assert eos not in with_eos.new_token_ids[:-1]
    # a stop string: text cut before it, finish reason stop
    text = free_run.text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop and "\ufffd" not in stop
    out = eng.generate([p], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.text == text[: text.index(stop)]
    assert eng.block_manager.num_used == 0


def test_logprobs_in_outputs(demo_path):
    eng = engine(demo_path)
    out = eng.generate(prompts((9,)), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=3))[0]
    assert len(out.logprobs) == 4
    for tok, lp in zip(out.new_token_ids, out.logprobs):
        assert lp.token_id == tok and len(lp.top) == 3 and lp.top[0][0] == tok and lp.top[0][1] == lp.logprob


def test_invalid_requests_are_refused_before_allocation(demo_path):
    eng = engine(demo_path, max_model_len=64)
    cases = [
        ([1] * 64, GREEDY, "prompt"),
        ([1] * 60, SamplingParams(max_tokens=5), "max_tokens"),
        ([], GREEDY, "prompt"),
        ([1, 5000], GREEDY, "prompt_token_ids"),
        ([1, 2], SamplingParams(temperature=-1), "temperature"),
        ([1, 2], SamplingParams(top_p=0), "top_p"),
        ([1, 2], SamplingParams(top_k=-2), "top_k"),
        ([1, 2], SamplingParams(max_tokens=0), "max_tokens"),
        ([1, 2], SamplingParams(logprobs=50), "logprobs"),
    ]
    for prompt, sampling, param in cases:
        with pytest.raises(InvalidRequest) as err:
            eng.add_request("bad", prompt, sampling)
        assert err.value.param == param
    with pytest.raises(InvalidRequest, match=r"prompt \(60 tokens\) \+ max_tokens \(5\) = 65 exceeds max_model_len 64"):
        eng.add_request("bad", [1] * 60, SamplingParams(max_tokens=5))
    assert not eng.has_unfinished() and eng.block_manager.num_used == 0
    eng.add_request("dup", [1, 2], GREEDY)
    with pytest.raises(InvalidRequest) as err:
        eng.add_request("dup", [1, 2], GREEDY)
    assert err.value.param == "request_id"
    eng.abort("dup")
    eng.step()
    small = engine(demo_path, num_kv_blocks=4)
    with pytest.raises(InvalidRequest, match="KV blocks"):
        small.add_request("big", [1] * 60, SamplingParams(max_tokens=10))


def test_config_errors():
    with pytest.raises(ConfigError, match="--block-size"):
        EngineConfig(block_size=12).validate()
    with pytest.raises(ConfigError, match="--kv-cache-memory"):
        EngineConfig(kv_cache_memory="lots").validate()
    with pytest.raises(ConfigError, match="--kv-load-failure-policy"):
        EngineConfig(kv_load_failure_policy="retry").validate()  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- P/D hooks


def prefill_remote(prefill: LLMEngine, request_id: str, prompt: list[int], sampling=GREEDY):
    """Run a prefill with do_remote_decode; returns its single, final output."""
    prefill.add_request(request_id, prompt, sampling, pin_for_transfer=f"t-{request_id}")
    outs = []
    while prefill.has_unfinished():
        outs += prefill.step()
    assert len(outs) == 1
    return outs[0]


def copy_blocks(src: LLMEngine, src_blocks: list[int], dst: LLMEngine, dst_blocks: list[int]) -> None:
    """What the connector does over the network, as a tensor copy of block ranges."""
    assert len(src_blocks) == len(dst_blocks)
    if src_blocks:
        dst.kv_cache.data[torch.tensor(dst_blocks)] = src.kv_cache.data[torch.tensor(src_blocks)]


def decode_all(eng: LLMEngine) -> dict:
    outs: dict[str, list] = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs.setdefault(o.request_id, []).append(o)
    return outs


@pytest.mark.parametrize("reuse_prefix", [False, True])
def test_remote_prefill_then_decode_matches_colocated(demo_path, reuse_prefix):
    ps = prompts((20, 33, 48), seed=6)
    sampling = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    reference = engine(demo_path, enable_prefix_caching=False).generate(ps, sampling)
    prefill = engine(demo_path)
    decode = engine(demo_path, num_kv_blocks=128, enable_prefix_caching=reuse_prefix)
    if reuse_prefix:
        decode.generate(ps, sampling)  # leaves the prompts' full blocks in the decode side's prefix cache
    allocs = {}
    for i, p in enumerate(ps):
        first = prefill_remote(prefill, f"p{i}-{reuse_prefix}", p, sampling)
        assert first.finish_reason == "remote_decode" and first.new_token_ids == reference[i].new_token_ids[:1]
        assert first.pinned_block_ids and len(first.pinned_block_ids) == ceil_div(len(p), 16)
        assert prefill.stats().kv_blocks_pinned >= len(first.pinned_block_ids)
        rid = f"d{i}"
        alloc = decode.add_remote_request(RemoteRequest(rid, p, first.new_token_ids[0], sampling, len(p)))
        if reuse_prefix:
            assert alloc.num_cached_blocks == len(p) // 16
        else:
            assert alloc.num_cached_blocks == 0
        allocs[rid] = (first, alloc)
        n = alloc.num_cached_blocks
        copy_blocks(prefill, first.pinned_block_ids[n:], decode, alloc.block_ids[n : len(first.pinned_block_ids)])
    # nothing is scheduled while the KV is "in flight"
    assert not decode.has_work() and decode.step() == []
    assert decode.stats().waiting_for_remote_kvs == 3
    for rid in allocs:
        decode.finish_remote_kv(rid, ok=True)
    outs = decode_all(decode)
    for i, p in enumerate(ps):
        first, _ = allocs[f"d{i}"]
        got = outs[f"d{i}"]
        assert first.new_token_ids + [t for o in got for t in o.new_token_ids] == reference[i].new_token_ids
        assert first.text + "".join(o.text for o in got) == reference[i].text
        assert got[-1].finish_reason == "length" and got[-1].usage.completion_tokens == 8
        assert prefill.release_transfer(f"t-p{i}-{reuse_prefix}")
    assert prefill.stats().kv_blocks_pinned == 0 and prefill.block_manager.num_used == 0
    assert decode.block_manager.num_used == 0


def test_seeded_remote_decode_continues_the_colocated_draws(demo_path):
    p = prompts((25,), seed=12)[0]
    sampling = SamplingParams(max_tokens=10, temperature=0.8, top_k=20, seed=1234, ignore_eos=True)
    reference = engine(demo_path, enable_prefix_caching=False).generate([p], sampling)[0].new_token_ids
    prefill = engine(demo_path)
    first = prefill_remote(prefill, "seeded", p, sampling)
    decode = engine(demo_path, num_kv_blocks=128)
    alloc = decode.add_remote_request(RemoteRequest("seeded", p, first.new_token_ids[0], sampling, len(p)))
    copy_blocks(prefill, first.pinned_block_ids, decode, alloc.block_ids[: len(first.pinned_block_ids)])
    decode.finish_remote_kv("seeded", ok=True)
    rest = [t for o in decode_all(decode)["seeded"] for t in o.new_token_ids]
    assert first.new_token_ids + rest == reference
    assert prefill.release_transfer("t-seeded")


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_remote_kv_failure_policy(demo_path, policy):
    p = prompts((37,), seed=7)[0]
    reference = engine(demo_path, enable_prefix_caching=False).generate([p], GREEDY)[0]
    decode = engine(demo_path, kv_load_failure_policy=policy, enable_prefix_caching=False)
    alloc = decode.add_remote_request(RemoteRequest("r", p, reference.new_token_ids[0], GREEDY, len(p)))
    assert alloc.num_cached_blocks == 0 and decode.block_manager.num_used == 3
    decode.finish_remote_kv("r", ok=False)  # KV blocks hold garbage (zeros): never read
    outs = decode_all(decode)["r"]
    if policy == "recompute":
        assert reference.new_token_ids[:1] + [t for o in outs for t in o.new_token_ids] == reference.new_token_ids
    else:
        assert outs[-1].finish_reason == "error" and outs[-1].error and outs[-1].new_token_ids == []
    assert decode.block_manager.num_used == 0


def test_remote_request_finished_by_its_first_token(demo_path):
    p = prompts((10,), seed=8)[0]
    prefill = engine(demo_path)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    out = prefill_remote(prefill, "short", p, one)
    assert out.finish_reason == "length" and out.pinned_block_ids is None
    assert prefill.stats().kv_blocks_pinned == 0 and prefill.block_manager.num_used == 0
    decode = engine(demo_path, num_kv_blocks=128)
    decode.add_remote_request(RemoteRequest("short", p, out.new_token_ids[0], one, len(p)))
    decode.finish_remote_kv("short", ok=True)
    final = decode_all(decode)["short"]
    assert final[-1].finish_reason == "length" and final[-1].new_token_ids == [] and final[-1].text == ""
    assert decode.block_manager.num_used == 0


def test_remote_request_errors(demo_path):
    decode = engine(demo_path, num_kv_blocks=128)
    with pytest.raises(InvalidRequest) as err:
        decode.add_remote_request(RemoteRequest("x", [1, 2, 3], 5, GREEDY, num_remote_tokens=4))
    assert err.value.param == "num_remote_tokens"
    assert not decode.finish_remote_kv("unknown", ok=True)  # e.g. aborted meanwhile
    decode.add_request("local", [1, 2, 3], GREEDY)
    with pytest.raises(InvalidRequest):
        decode.finish_remote_kv("local", ok=True)
    decode.abort("local")
    decode.step()
    assert decode.block_manager.num_used == 0


def test_abort_at_every_stage_frees_blocks(demo_path):
    eng = engine(demo_path, max_num_batched_tokens=16)
    p = prompts((40,), seed=9)[0]

    def abort(rid):
        assert eng.abort(rid)
        out = eng.step()
        assert [(o.request_id, o.finish_reason) for o in out if o.finished] == [(rid, "abort")]
        assert eng.block_manager.num_used == 0 and not eng.has_unfinished()

    eng.add_request("waiting", p, GREEDY)
    abort("waiting")
    eng.add_request("chunked", p, GREEDY)
    eng.step()  # 16 of 40 prompt tokens computed
    assert eng.requests["chunked"].num_computed_tokens == 16
    abort("chunked")
    eng.add_request("decoding", p, GREEDY)
    for _ in range(5):
        eng.step()
    assert eng.requests["decoding"].num_output_tokens >= 2
    abort("decoding")
    eng.add_remote_request(RemoteRequest("remote", p, 7, GREEDY, len(p)))
    abort("remote")
    assert not eng.abort("remote")
    # a pinned prefill has finished: its blocks are released by release_transfer
    out = prefill_remote(eng, "pinned", p)
    assert eng.block_manager.num_used == len(out.pinned_block_ids)
    assert not eng.abort("pinned")
    assert eng.release_transfer("t-pinned") and not eng.release_transfer("t-pinned")
    assert eng.block_manager.num_used == 0


# ---------------------------------------------------------------------------- AsyncEngine


async def collect(stream) -> list:
    return [out async for out in stream]


async def test_async_generate_steps_off_the_event_loop(demo_path):
    eng = engine(demo_path, enable_prefix_caching=False)
    ps = prompts()
    reference = tokens(eng.generate(ps, GREEDY))
    step_threads = set()
    step = eng.step

    def recording_step():
        step_threads.add(threading.current_thread().name)
        return step()

    eng.step = recording_step
    async_engine = AsyncEngine(eng)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    tick_task = asyncio.create_task(ticker())
    try:
        results = await asyncio.gather(*(collect(async_engine.generate(f"a{i}", p, GREEDY)) for i, p in enumerate(ps)))
    finally:
        tick_task.cancel()
        await async_engine.shutdown(timeout=5)
        del eng.step
    assert [[t for o in outs for t in o.new_token_ids] for outs in results] == reference
    assert all(outs[-1].finish_reason == "length" and outs[-1].usage.completion_tokens == 10 for outs in results)
    assert step_threads == {"engine-step"}
    assert ticks > 5  # the loop kept running while the model computed


async def test_async_remote_request_waits_for_kv_then_decodes(demo_path):
    p = prompts((30,), seed=10)[0]
    reference = engine(demo_path, enable_prefix_caching=False).generate([p], GREEDY)[0]
    prefill = engine(demo_path)
    first = prefill_remote(prefill, "ap", p)
    decode = engine(demo_path, num_kv_blocks=3, enable_prefix_caching=False)  # room for one request only
    async_engine = AsyncEngine(decode)
    try:
        alloc = await async_engine.add_remote(RemoteRequest("ad", p, first.new_token_ids[0], GREEDY, len(p)))
        stream = async_engine.stream("ad")
        # a second one finds no free blocks and waits for them
        second = asyncio.create_task(
            async_engine.add_remote(RemoteRequest("ad2", p, first.new_token_ids[0], GREEDY, len(p)))
        )
        await asyncio.sleep(0.2)
        assert not second.done()
        await eventually(lambda: (async_engine.latest_stats.waiting_for_remote_kvs, async_engine.latest_stats.running)
                         == (1, 0), timeout=30)
        copy_blocks(prefill, first.pinned_block_ids, decode, alloc.block_ids[: len(first.pinned_block_ids)])
        async_engine.finish_remote_kv("ad", ok=True)
        outs = await collect(stream)
        assert first.new_token_ids + [t for o in outs for t in o.new_token_ids] == reference.new_token_ids
        alloc2 = await asyncio.wait_for(second, timeout=10)  # blocks of "ad" freed
        assert len(alloc2.block_ids) == 2
        async_engine.finish_remote_kv("ad2", ok=False)  # recompute
        outs2 = await collect(async_engine.stream("ad2"))
        assert first.new_token_ids + [t for o in outs2 for t in o.new_token_ids] == reference.new_token_ids
        assert prefill.release_transfer("t-ap")
        assert not await async_engine.release_transfer("t-ap")  # the decode side pinned nothing
    finally:
        await async_engine.shutdown(timeout=5)
    assert decode.block_manager.num_used == 0 and prefill.block_manager.num_used == 0


async def test_async_cancel_and_abort_free_blocks(demo_path):
    eng = engine(demo_path)
    async_engine = AsyncEngine(eng)
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    p = prompts((20,), seed=11)[0]

    async def consume_forever(rid):
        async for _ in async_engine.generate(rid, p, long):
            pass

    try:
        task = asyncio.create_task(consume_forever("cancelled"))
        await eventually(lambda: async_engine.latest_stats.running > 0, timeout=30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # an explicit abort ends the stream with finish reason "abort"
        stream = async_engine.generate("aborted", p, long)
        first = await stream.__anext__()
        assert first.new_token_ids
        assert await async_engine.abort("aborted")
        rest = await collect(stream)
        assert rest[-1].finish_reason == "abort"
        await eventually(lambda: (async_engine.latest_stats.running, async_engine.latest_stats.kv_blocks_used)
                         == (0, 0), timeout=30)
        with pytest.raises(InvalidRequest):
            await async_engine.add_remote(RemoteRequest("bad", p, 1, GREEDY, 3))
    finally:
        await async_engine.shutdown(timeout=5)


async def test_async_remote_wait_for_blocks_timeout_holds_nothing(demo_path):
    eng = engine(demo_path, num_kv_blocks=3, enable_prefix_caching=False)
    async_engine = AsyncEngine(eng)
    p = prompts((30,), seed=13)[0]
    try:
        await async_engine.add_remote(RemoteRequest("holder", p, 5, GREEDY, len(p)))
        with pytest.raises(asyncio.TimeoutError):
            late = async_engine.add_remote(RemoteRequest("late", p, 5, GREEDY, len(p)))
            await asyncio.wait_for(late, 0.2)
        assert await async_engine.abort("holder")
        # "late" got no blocks after "holder" freed them
        await eventually(lambda: (async_engine.latest_stats.kv_blocks_used,
                                  async_engine.latest_stats.waiting_for_remote_kvs) == (0, 0), timeout=30)
        assert not await async_engine.abort("late")
    finally:
        await async_engine.shutdown(timeout=5)


async def test_async_shutdown_ends_streams_and_refuses_calls(demo_path):
    eng = engine(demo_path)
    async_engine = AsyncEngine(eng)
    stream = async_engine.generate("s", prompts((10,))[0], SamplingParams(max_tokens=500, temperature=0, ignore_eos=True))
    await stream.__anext__()
    await async_engine.shutdown(timeout=5)
    rest = await collect(stream)
    assert rest[-1].finish_reason == "abort"
    with pytest.raises(EngineDead):
        await async_engine.abort("s")
    assert not eng.has_unfinished() and eng.block_manager.num_used == 0


class PushRecorder:
    """A ``KVPush`` that records the windows the engine reports."""

    def __init__(self) -> None:
        self.windows: list[tuple[int, int, list[int]]] = []

    def computed(self, start: int, end: int, block_ids: list[int], ready) -> None:
        assert ready is None  # CPU: the step's KV is in the cache when the step returns
        self.windows.append((start, end, block_ids))


def run_pushes(eng: LLMEngine, ps: list[list[int]]) -> tuple[dict[str, PushRecorder], dict[str, list[int]]]:
    """Push-mode prefill of every prompt: the recorders, and the blocks each request pinned at its finish."""
    recorders = {f"push-{i}": PushRecorder() for i in range(len(ps))}
    for (rid, recorder), prompt in zip(recorders.items(), ps):
        eng.add_request(rid, prompt, SamplingParams(max_tokens=4, temperature=0.0), pin_for_transfer=f"t-{rid}",
                        push=recorder)
    pinned = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                assert out.finish_reason == "remote_decode"
                pinned[out.request_id] = out.pinned_block_ids
    for rid in recorders:
        eng.release_transfer(f"t-{rid}")
    return recorders, pinned


def test_push_hook_reports_each_chunk_then_the_pinned_blocks_hold_it(demo_path):
    eng = engine(demo_path, max_num_batched_tokens=16)
    prompt = prompts((50,), seed=5)[0]
    recorders, pinned = run_pushes(eng, [prompt])
    recorder = recorders["push-0"]
    assert [(s, e) for s, e, _ in recorder.windows] == [(0, 16), (16, 32), (32, 48), (48, 50)]
    assert recorder.windows[-1][2][:4] == pinned["push-0"]  # reported before the finish pinned the same blocks
    # Again: the prefix cache serves 48 tokens; the first window still starts at 0 (the writer needs them all).
    recorders, _ = run_pushes(eng, [prompt])
    assert [(s, e) for s, e, _ in recorders["push-0"].windows] == [(0, 50)]


def test_a_handed_back_prompt_becomes_cache_hits_with_its_first_step_not_before(demo_path):
    """The hand-back does not hash the landed prompt (that would delay the first step); the first step's
    launch registers its full blocks, and a request ended by its first token registers them at once."""
    p = prompts((40,), seed=9)[0]
    prefill = engine(demo_path)
    sampling = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    first = prefill_remote(prefill, "landed", p, sampling)
    decode = engine(demo_path, num_kv_blocks=128)
    decode.add_remote_request(RemoteRequest("landed", p, first.new_token_ids[0], sampling, len(p)))
    decode.finish_remote_kv("landed", ok=True)
    seq = decode.requests["landed"]
    assert seq.block_hashes == []
    decode.step()
    assert len(seq.block_hashes) == len(p) // decode.block_manager.block_size
    decode_all(decode)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    q = prompts((40,), seed=10)[0]
    out = prefill_remote(prefill, "ended", q, one)
    decode.add_remote_request(RemoteRequest("ended", q, out.new_token_ids[0], one, len(q)))
    decode.finish_remote_kv("ended", ok=True)
    decode_all(decode)
    again = decode.add_remote_request(RemoteRequest("again", q, out.new_token_ids[0], one, len(q)))
    assert again.num_cached_blocks == len(q) // decode.block_manager.block_size
    decode.abort("again")
    decode_all(decode)
