"""Push mode under preemption: a prefill with a tiny KV cache computes several long prompts at once, runs out
of blocks and preempts (recomputes) sequences whose KV it is already pushing into decode's pre-allocated
blocks.  A window reported before a preemption names blocks that are freed and may be reused before the
writer copies them, so after its last preemption a sequence must report its whole prompt again, from the
blocks it finally pins.  Engine level (the windows, deterministic) and real processes (registry, that prefill,
a decode, a colocated baseline; demo model on CPU, Mooncake TCP on loopback: output identical, both sides
idle afterwards)."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from bench.engine_driver import EngineDriver, prompt_ids, tokens
from bench.processes import Processes
from common.arith import ceil_div
from common.engine.config import EngineConfig
from common.engine.engine import LLMEngine
from common.engine.loader import resolve_model_path
from common.engine.sequence import SequenceStatus
from common.messages import SamplingParams

CHUNK = 512  # a step computes one prompt's tail and the next one's head: the newer is preempted when it grows
NUM_KV_BLOCKS = 40  # 640 tokens: two prompts of the lengths below never fit together
LENGTHS = (300, 420, 350, 380, 330, 400)
PUSH = ("--kv-mode", "push", "--kv-handshake-timeout-s", "3", "--kv-rpc-timeout-s", "3")


class Windows:
    """A ``KVPush`` that records the windows the engine reports, and where each preemption fell among them."""

    def __init__(self) -> None:
        self.windows: list[tuple[int, int, list[int]]] = []
        self.restart = 0  # index of the first window after the last preemption

    def computed(self, start: int, end: int, block_ids: list[int], ready) -> None:
        self.windows.append((start, end, block_ids))


def test_after_its_last_preemption_a_sequence_reports_its_whole_prompt_from_its_pinned_blocks():
    eng = LLMEngine(EngineConfig(model=str(resolve_model_path("demo")), dtype="float32", device="cpu",
                                 num_kv_blocks=NUM_KV_BLOCKS, max_num_batched_tokens=CHUNK))
    prompts = {f"p{n}": prompt_ids(n, seed=n) for n in LENGTHS}
    pushes = {rid: Windows() for rid in prompts}
    for rid, ids in prompts.items():
        eng.add_request(rid, ids, SamplingParams(max_tokens=4, temperature=0.0), pin_for_transfer=rid,
                        push=pushes[rid])
    computed = dict.fromkeys(prompts, 0)
    restarted, pinned = set(), []
    while eng.has_unfinished():
        outputs = eng.step()
        for transfer_id in pinned:  # as the writer does once decode has every window: a step later
            eng.release_transfer(transfer_id)
        pinned = []
        for out in outputs:
            if not out.finished:
                continue
            assert out.finish_reason == "remote_decode"
            windows = pushes[out.request_id].windows[pushes[out.request_id].restart:]
            n = len(prompts[out.request_id])
            assert [(s, e) for s, e, _ in windows] == list(zip([0] + [e for _, e, _ in windows[:-1]],
                                                               [e for _, e, _ in windows])), windows
            assert windows[-1][1] == n
            for _, end, block_ids in windows:  # every window's blocks are the ones pinned now
                used = ceil_div(end, eng.block_manager.block_size)
                assert block_ids[:used] == out.pinned_block_ids[:used]
            pinned.append(out.request_id)
        for rid, seq in eng.requests.items():
            if seq.status is SequenceStatus.WAITING and computed[rid] > seq.num_computed_tokens == 0:
                pushes[rid].restart = len(pushes[rid].windows)
                restarted.add(rid)
            computed[rid] = seq.num_computed_tokens
    for transfer_id in pinned:
        eng.release_transfer(transfer_id)
    assert restarted and eng.scheduler.num_preemptions >= len(restarted), eng.scheduler.num_preemptions
    assert eng.block_manager.num_used == 0 and eng.block_manager.num_pinned == 0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def driver():
    async with Processes() as procs:
        procs.start_registry()
        procs.start_engine("prefill", "prefill", *PUSH, "--max-num-batched-tokens", str(CHUNK),
                           num_kv_blocks=NUM_KV_BLOCKS)
        procs.start_engine("decode", "decode", *PUSH)
        procs.start_engine("both", "prefill", "--role", "both")
        await procs.wait_registered("prefill", "decode", "both")
        d = EngineDriver(procs.engine_endpoints())
        try:
            yield d
        finally:
            await d.close()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_prefill_preempting_sequences_it_pushes_leaves_decode_the_final_kv(driver: EngineDriver):
    prompts = [prompt_ids(n, seed=n) for n in LENGTHS]
    expected = [await driver.reference(ids) for ids in prompts]
    results = await asyncio.gather(*(driver.push_pd(f"preempt-{i}", ids) for i, ids in enumerate(prompts)))
    assert (await driver.stats("prefill")).num_preemptions > 0
    assert [tokens(pre + dec) for pre, dec in results] == expected
    await driver.wait_idle("prefill", "decode")
