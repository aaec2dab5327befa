"""P/D between tensor-parallel instances, end to end with real processes, real Mooncake transfers (and shared
memory between the ranks of one host), gloo on CPU: greedy output token-identical to a colocated TP 1 engine.

Engines (demo model, 2 KV heads: each rank of a TP 2 instance holds one):
``p1`` prefill TP 1 (TCP), ``p2`` prefill TP 2 (every transport: shared memory to same-host readers),
``p2-32`` prefill TP 2 with 32-token blocks (TCP), ``d1`` decode TP 1 (TCP), ``d2`` decode TP 2 (every
transport), and ``both``, the colocated TP 1 reference.  The test that kills a rank runs last.
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import pytest_asyncio

from bench.engine_driver import EngineDriver, prompt_ids, tokens
from bench.processes import Processes
from common.errors import PeerError
from common.messages import Generate, SamplingParams
from tests.test_tp_service import children

pytestmark = pytest.mark.asyncio(loop_scope="module")

LEASE_S = 3.0
FLAGS = ("--kv-handshake-timeout-s", "10", "--kv-rpc-timeout-s", "10", "--kv-renew-interval-s", "0.5",
         "--kv-lease-sweep-interval-s", "0.2", "--tensor-parallel-timeout-s", "10")  # fmt: skip
PREFILL = (*FLAGS, "--kv-lease-seconds", str(LEASE_S))
LENGTHS = [1, 7, 16, 17, 32, 100, 300]  # shorter than a block, exact multiples of 16 and 32, long
LONG = SamplingParams(max_tokens=2000, temperature=0.0, ignore_eos=True)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def driver():
    async with Processes() as procs:
        procs.start_registry()
        procs.start_engine("p1", "prefill", *PREFILL)
        procs.start_engine("p2", "prefill", *PREFILL, "-tp", "2", kv_transport="shm,tcp")
        procs.start_engine("p2-32", "prefill", *PREFILL, "-tp", "2", "--block-size", "32")
        procs.start_engine("d1", "decode", *FLAGS)
        procs.start_engine("d2", "decode", *FLAGS, "-tp", "2", kv_transport="shm,tcp")
        procs.start_engine("both", "prefill", "--role", "both", *FLAGS)
        await procs.wait_registered("p1", "p2", "p2-32", "d1", "d2", "both", timeout_s=240)
        d = EngineDriver(procs.engine_endpoints(), timeout_s=120.0)
        d.procs = procs
        try:
            yield d
        finally:
            await d.close()


async def test_tp_sizes_are_in_the_registered_fingerprints(driver):
    listed = await driver.procs.instances()
    assert {name: listed[name].fingerprint.tensor_parallel_size for name in ("p1", "p2", "d1", "d2")} == \
        {"p1": 1, "p2": 2, "d1": 1, "d2": 2}


@pytest.mark.parametrize(("prefill", "decode", "transport"), [
    ("p1", "d2", "tcp"),  # TP 1 -> TP 2: each decode rank reads its head from the one prefill rank
    ("p2", "d1", "tcp"),  # TP 2 -> TP 1: the decode rank reads one head from each prefill rank
    ("p2", "d2", "shm"),  # TP 2 -> TP 2: rank to rank, over shared memory (same host)
    ("p2-32", "d1", "tcp"),  # TP 2, 32-token blocks -> TP 1, 16-token blocks
    ("p2-32", "d2", "tcp"),  # TP 2, 32-token blocks -> TP 2, 16-token blocks
])  # fmt: skip
async def test_pd_across_tp_sizes_identical_to_colocated(driver, prefill: str, decode: str, transport: str):
    case = sum(map(ord, prefill + decode))  # prompts of their own: no prefix-cache hits from another case
    prompts = [prompt_ids(length, seed=1000 * case + length) for length in LENGTHS]
    refs = await asyncio.gather(*(driver.reference(ids) for ids in prompts))
    results = await asyncio.gather(*(driver.pd(f"{prefill}-{decode}-{len(ids)}", ids, prefill=prefill,
                                               decode=decode) for ids in prompts))  # concurrent requests
    for ids, ref, (pre, dec) in zip(prompts, refs, results):
        assert tokens(pre + dec) == ref, f"prompt of {len(ids)} tokens, {prefill} -> {decode}"
        assert dec[0].timings["kv_bytes"] > 0 and "kv_failed" not in dec[0].timings
    assert (await driver.stats(decode)).kv_transports[prefill] == transport
    # Again: decode's prefix cache holds the leading full blocks; only the tokens after them are read.
    ids = prompts[LENGTHS.index(100)]
    pre, dec = await driver.pd(f"{prefill}-{decode}-again", ids, prefill=prefill, decode=decode)
    assert tokens(pre + dec) == refs[LENGTHS.index(100)]
    assert 0 < dec[0].timings["kv_bytes"] < results[LENGTHS.index(100)][1][0].timings["kv_bytes"]
    await driver.wait_idle(prefill, decode, "both")


async def test_heterogeneous_reads_move_the_same_bytes_as_homogeneous_ones(driver):
    """Every head of every token is read once, whichever ranks hold it (fresh prompts: no prefix hits)."""
    moved = {}
    for i, (prefill, decode) in enumerate((("p1", "d1"), ("p1", "d2"), ("p2", "d1"), ("p2", "d2"))):
        _, dec = await driver.pd(f"bytes-{prefill}-{decode}", prompt_ids(64, seed=900 + i), prefill=prefill,
                                 decode=decode)
        moved[prefill, decode] = dec[0].timings["kv_bytes"]
    assert len(set(moved.values())) == 1, moved
    await driver.wait_idle("p1", "p2", "d1", "d2")


async def test_a_killed_decode_rank_fails_in_flight_requests_and_the_instance_exits(driver):
    procs = driver.procs
    ids = prompt_ids(40, seed=11)
    pre = await driver.prefill_leg("p2", "killed", ids, LONG)
    stream = driver.client("d2").stream(Generate("killed", LONG, prompt_token_ids=ids,
                                                 remote_prefill=pre[-1].kv_transfer))
    assert (await anext(stream)).token_ids
    unread = await driver.prefill_leg("p2", "unread", prompt_ids(64, seed=12))  # leased for a decode that dies
    assert (await driver.stats("p2")).load.kv_blocks_pinned > 0
    (worker,) = children(procs.procs["d2"].popen.pid)
    os.kill(worker, signal.SIGKILL)
    with pytest.raises(PeerError, match="TensorParallelError"):
        async with asyncio.timeout(60):
            async for _ in stream:
                pass
    assert await procs.wait_exit("d2", timeout_s=60) != 0
    assert unread[-1].kv_transfer is not None
    # Nothing stays pinned on the prefill once the lease of the transfer nobody read ends.
    await driver.wait_idle("p2", timeout_s=LEASE_S + 15.0)
