"""Issue 15, decode prefix-cache poisoning: a decode given block ids other than those the prefill's lease
holds refuses the transfer (typed error, nothing cached, its blocks freed), whatever its
``--kv-load-failure-policy``; the right prompt later still gives the colocated output.

Real prefill, decode and colocated services over real ZMQ and Mooncake TCP on loopback.
"""

from __future__ import annotations

import msgspec
import pytest
import pytest_asyncio

from bench.engine_driver import prompt_ids, tokens
from common.errors import PeerError
from common.messages import Abort
from tests.test_engine_service import BLOCK, Cluster, running_cluster

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster():
    async with running_cluster({role: dict(role=role) for role in ("prefill", "decode", "both")}) as cluster:
        yield cluster


async def test_a_decode_given_other_blocks_than_the_lease_holds_refuses_and_caches_nothing(cluster: Cluster):
    other, victim = prompt_ids(40, seed=101), prompt_ids(40, seed=102)
    ref = await cluster.reference(victim)
    other_params = (await cluster.prefill_leg("prefill", "poison-other", other))[-1].kv_transfer
    victim_pre = await cluster.prefill_leg("prefill", "poison-victim", victim)
    # The victim's transfer, naming the other prompt's blocks: a decode that read them would cache the other
    # prompt's KV under the victim prompt's hash.
    forged = msgspec.structs.replace(victim_pre[-1].kv_transfer, block_ids=other_params.block_ids)
    with pytest.raises(PeerError) as refused:
        await cluster.decode_leg("decode", "poison-victim", victim, forged)
    assert (refused.value.code, refused.value.param) == ("kv_transfer_failed", "remote_prefill.block_ids")
    await cluster.client("prefill").call(Abort("poison-other"))  # nobody reads the other prompt's blocks
    await cluster.wait_idle("prefill", "decode")  # the refused transfer was released, the decode's blocks freed
    pre, dec = await cluster.pd("poison-again", victim)
    assert tokens(pre + dec) == ref
    token_bytes = cluster.services["decode"].layout.block_bytes // BLOCK
    assert dec[0].timings["kv_bytes"] == 40 * token_bytes  # no decode-side prefix hit: nothing was cached
    await cluster.wait_idle("prefill", "decode")

