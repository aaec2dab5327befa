"""AsyncEngine: a call that finds the engine thread asleep runs on the event loop at once; one that finds
a step running waits for the thread (never touching the engine alongside it)."""

import asyncio
import logging
import random
import re
import threading

from common.engine.async_engine import AsyncEngine
from common.engine.config import EngineConfig
from common.engine.engine import LLMEngine
from common.engine.sequence import RemoteRequest
from common.messages import SamplingParams
from tests.procs import eventually

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
# long enough to be still generating when the test aborts it (4 tokens could end first on a loaded host)
STILL_RUNNING = SamplingParams(max_tokens=600, temperature=0.0, ignore_eos=True)


def demo_engine() -> LLMEngine:
    return LLMEngine(EngineConfig(model="demo", dtype="float32", device="cpu", num_kv_blocks=64))


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 330) for _ in range(n)]


def record_threads(core: LLMEngine) -> list[str]:
    """The names of the threads that ran ``core.add_remote_request``, in call order."""
    threads: list[str] = []
    add = core.add_remote_request

    def recording(remote: RemoteRequest):
        threads.append(threading.current_thread().name)
        return add(remote)

    core.add_remote_request = recording
    return threads


async def test_an_allocation_on_a_sleeping_engine_runs_on_the_event_loop_then_the_request_decodes():
    core = demo_engine()
    ids = prompt(40, seed=1)
    reference = core.generate([ids], GREEDY)[0].new_token_ids
    threads = record_threads(core)
    engine = AsyncEngine(core)
    try:
        await eventually(lambda: not engine._turn.locked(), timeout=30)  # the engine thread sleeps
        future = engine.add_remote(RemoteRequest("r", ids, reference[0], GREEDY, len(ids))).__await__()
        try:
            next(future)  # one step of the call: it must not suspend
            raise AssertionError("the allocation waited for the engine thread")
        except StopIteration as done:
            allocation = done.value
        assert threads == [threading.current_thread().name]
        assert len(allocation.block_ids) == 3  # 40 tokens and the first token's KV, 16-token blocks
        engine.finish_remote_kv("r", ok=False)  # no KV was read: the engine recomputes it, then decodes
        outputs = [out async for out in engine.stream("r")]
        assert reference[:1] + [t for out in outputs for t in out.new_token_ids] == reference
    finally:
        await engine.shutdown(timeout=5)
    assert core.block_manager.num_used == 0


async def test_an_allocation_during_a_step_waits_for_the_engine_thread():
    core = demo_engine()
    threads = record_threads(core)
    entered, gate = threading.Event(), threading.Event()
    step = core.step

    def held_step():
        entered.set()
        gate.wait(30)
        return step()

    core.step = held_step
    engine = AsyncEngine(core)
    try:
        stream = engine.generate("g", prompt(20, seed=2), STILL_RUNNING)
        first = asyncio.create_task(stream.__anext__())
        await eventually(entered.is_set, timeout=30)  # the engine thread is inside a step
        ids = prompt(30, seed=3)
        allocating = asyncio.create_task(engine.add_remote(RemoteRequest("r", ids, 5, GREEDY, len(ids))))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not allocating.done() and threads == []  # queued: the step holds the engine
        gate.set()
        await asyncio.wait_for(allocating, 30)
        assert threads == ["engine-step"]
        await asyncio.wait_for(first, 30)
        assert await engine.abort("r") and await engine.abort("g")
    finally:
        gate.set()
        await engine.shutdown(timeout=5)
    assert core.block_manager.num_used == 0


async def test_a_step_over_the_slow_step_threshold_is_logged_with_the_engine_counts(caplog):
    """One step made 0.8 s long by a stalled ``core.step``: one warning naming its length and the counts after
    it; the request still completes; the steps under the threshold log nothing."""
    core = demo_engine()
    step, stalled = core.step, []

    def stalling_step():
        if not stalled:
            stalled.append(True)
            threading.Event().wait(0.8)  # the stall (a collector pause, a compile...) inside the step
        return step()

    core.step = stalling_step
    engine = AsyncEngine(core, slow_step_log_s=0.5)
    try:
        with caplog.at_level(logging.WARNING, logger="common.engine.async_engine"):
            outputs = [out async for out in engine.generate("r", prompt(40, seed=2), GREEDY)]
        assert sum(len(out.new_token_ids) for out in outputs) == GREEDY.max_tokens
        slow = [r.getMessage() for r in caplog.records if "engine step took" in r.getMessage()]
        assert len(slow) == 1, slow
        found = re.fullmatch(r"engine step took (\d+\.\d{3}) s \(over 0\.500 s\); after it: [01] running, 0 waiting, "
                             r"0 waiting for remote KV, KV blocks \d+ used \(0 pinned\) of 64", slow[0])
        assert found and float(found[1]) >= 0.8, slow[0]
    finally:
        await engine.shutdown(timeout=5)


async def test_a_push_allocation_has_the_engine_thread_hash_its_prompt_before_the_kv_lands():
    core = demo_engine()
    ids = prompt(40, seed=3)
    engine = AsyncEngine(core)
    try:
        await engine.add_remote(RemoteRequest("push", ids, None, GREEDY, len(ids)))  # push: no first token yet
        seq = core.requests["push"]
        await eventually(lambda: len(seq.prompt_hashes) == 40 // core.block_size, timeout=30)
        await engine.add_remote(RemoteRequest("read", ids, 7, GREEDY, len(ids)))  # read mode: its KV comes at once
        await engine.add_remote(RemoteRequest("push-2", ids, None, GREEDY, len(ids)))
        # the engine thread applies commands in order: a hashing of the read's prompt would have run first
        await eventually(lambda: len(core.requests["push-2"].prompt_hashes) == 40 // core.block_size, timeout=30)
        assert core.requests["read"].prompt_hashes == []
    finally:
        await engine.shutdown()
