"""Push mode's hand-back on decode (``services/decode/push.py``), in one event loop: a real decode service in
push mode (demo model, CPU) whose ``DecodePush`` the test drives as its bus server would: the decode leg's
generator, and ``PushDone`` as the KV side channel's handler gets it.

* ``PushDone`` hands the request back to an idle engine before its handler returns: the engine steps
  without waiting for the decode leg's coroutine to resume;
* a decode leg that leaves after its push settled (cancelled between the ``PushDone`` and its resumption)
  frees the request: nobody else would.
"""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from common.engine.sequence import SequenceStatus
from common.messages import Generate, PushDone, SamplingParams
from services.decode.push import DecodePush
from tests.procs import eventually
from tests.test_engine_service import Cluster, running_cluster

pytestmark = pytest.mark.asyncio(loop_scope="module")

SAMPLING = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster():
    async with running_cluster({"decode": dict(role="decode", kv_mode="push")}) as cluster:
        yield cluster


async def registered(cluster: Cluster, request_id: str):
    """The decode leg of ``request_id`` (its generator), past its registration, waiting for its push; and the
    slot's transfer id."""
    push: DecodePush = cluster.services["decode"].role.push
    leg = push.generate(Generate(request_id, SAMPLING, prompt_token_ids=list(range(1, 40)), await_push=True))
    target = (await anext(leg)).push_target
    waiting = asyncio.ensure_future(anext(leg))
    await asyncio.sleep(0)  # the leg now awaits its slot
    return push, leg, waiting, target.transfer_id


async def test_push_done_hands_the_request_back_before_the_decode_leg_resumes(cluster: Cluster):
    await cluster.wait_idle("decode")
    push, leg, waiting, transfer_id = await registered(cluster, "handed")
    core, engine = cluster.services["decode"].core, cluster.services["decode"].engine
    # the engine thread hashes the prompt while the prefill would compute it, then sleeps again
    await eventually(lambda: len(core.requests["handed"].prompt_hashes) == 39 // core.block_size
                     and not engine._turn.locked(), timeout=30)
    await push._on_done(PushDone(transfer_id, 7))
    assert core.requests["handed"].status is not SequenceStatus.WAITING_FOR_REMOTE_KVS  # no loop turn yet
    outputs = [await waiting, *[out async for out in leg]]
    assert sum(len(out.token_ids) for out in outputs) == SAMPLING.max_tokens - 1  # the prefill's token is not resent
    await cluster.wait_idle("decode")


async def test_a_decode_leg_cancelled_after_its_push_settled_frees_the_request(cluster: Cluster):
    await cluster.wait_idle("decode")
    push, leg, waiting, transfer_id = await registered(cluster, "left")
    await push._on_done(PushDone(transfer_id, 7))
    waiting.cancel()  # before the leg resumed
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await leg.aclose()
    await cluster.wait_idle("decode", timeout_s=10)  # no request, no block left
