"""End to end with real processes: registry, prefill, two decodes and a colocated (``--role both``)
baseline, demo model on CPU.  The prefill serves every transport it can (``auto``): ``decode`` reads
over Mooncake TCP on loopback (forced), ``decode-shm`` picks shared memory by itself (same host).
Block sizes differ across two more engines: ``prefill-32`` (32-token blocks, every transport) and
``decode-32`` (32-token blocks, TCP) read and are read by the 16-token ones, token positions mapped.

One set of processes serves the module (starting one costs seconds on two
cores); the tests that kill processes run last.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import pytest_asyncio

from bench.engine_driver import EngineDriver, prompt_ids, tokens
from bench.processes import Processes
from common.errors import BusError
from common.messages import Abort, Ack, Generate, SamplingParams

pytestmark = pytest.mark.asyncio(loop_scope="module")

LEASE_S = 3.0
SHUTDOWN_S = 3.0
ENGINE_FLAGS = ("--kv-handshake-timeout-s", "3", "--kv-rpc-timeout-s", "3", "--kv-renew-interval-s", "0.5",
                "--kv-lease-sweep-interval-s", "0.2", "--shutdown-timeout-s", str(SHUTDOWN_S))  # fmt: skip
LONG = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)


class Deployment(EngineDriver):
    def __init__(self, procs: Processes):
        super().__init__(procs.engine_endpoints(), timeout_s=60.0)
        self.procs = procs


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def deployment():
    async with Processes() as procs:
        procs.start_registry()
        procs.start_engine("prefill", "prefill", *ENGINE_FLAGS, "--kv-lease-seconds", str(LEASE_S),
                           kv_transport="shm,tcp")
        procs.start_engine("decode", "decode", *ENGINE_FLAGS)
        procs.start_engine("decode-shm", "decode", *ENGINE_FLAGS, kv_transport="auto")
        procs.start_engine("prefill-32", "prefill", *ENGINE_FLAGS, "--block-size", "32", "--kv-lease-seconds",
                           str(LEASE_S), kv_transport="shm,tcp")
        procs.start_engine("decode-32", "decode", *ENGINE_FLAGS, "--block-size", "32")
        # A short drain: the SIGTERM test needs its long stream to outlast it.
        procs.start_engine("both", "prefill", "--role", "both", *ENGINE_FLAGS, "--shutdown-timeout-s", "1")
        await procs.wait_registered("prefill", "decode", "decode-shm", "both", "prefill-32", "decode-32")
        d = Deployment(procs)
        try:
            yield d
        finally:
            await d.close()


async def test_instances_registered_with_their_roles(deployment: Deployment):
    listed = await deployment.procs.instances()
    assert {name: listed[name].role for name in ("prefill", "decode", "both")} == \
        {"prefill": "prefill", "decode": "decode", "both": "both"}
    for name in ("prefill", "decode", "both"):
        proc = deployment.procs.procs[name]
        assert (listed[name].request_endpoint, listed[name].kv_endpoint) == (proc.endpoint, proc.kv_endpoint)


LENGTHS = [1, 7, 15, 16, 17, 32, 48, 100, 300]


@pytest.mark.parametrize(("decode", "transport"), [("decode", "tcp"), ("decode-shm", "shm")])
async def test_pd_greedy_output_identical_to_colocated(deployment: Deployment, decode: str, transport: str):
    for length in LENGTHS:
        ids = prompt_ids(length, seed=length)
        ref = await deployment.reference(ids)
        pre, dec = await deployment.pd(f"len-{length}-{transport}", ids, decode=decode)
        assert tokens(pre + dec) == ref, f"prompt of {length} tokens over {transport}"
        assert dec[0].timings["kv_bytes"] > 0 and "kv_failed" not in dec[0].timings
    assert (await deployment.stats(decode)).kv_transports == {"prefill": transport}
    await deployment.wait_idle("prefill", decode, "both")


@pytest.mark.parametrize(("prefill", "decode", "transport"),
                         [("prefill", "decode-32", "tcp"), ("prefill-32", "decode", "tcp"),
                          ("prefill-32", "decode-shm", "shm")])
async def test_pd_across_block_sizes_identical_to_colocated(deployment: Deployment, prefill: str, decode: str,
                                                            transport: str):
    """16 -> 32 and 32 -> 16, all prompt lengths at once: shorter than a block, multiples of 16 and of 32, long."""
    prompts = [prompt_ids(length, seed=500 + length) for length in LENGTHS]
    refs = await asyncio.gather(*(deployment.reference(ids) for ids in prompts))
    results = await asyncio.gather(*(deployment.pd(f"bs-{len(ids)}-{prefill}-{decode}", ids, prefill=prefill,
                                                   decode=decode) for ids in prompts))
    for ids, ref, (pre, dec) in zip(prompts, refs, results):
        assert tokens(pre + dec) == ref, f"prompt of {len(ids)} tokens, {prefill} -> {decode}"
        assert dec[0].timings["kv_bytes"] > 0 and "kv_failed" not in dec[0].timings
    # Again: decode's prefix cache now holds the leading full blocks; only the tokens after them are read.
    ids = prompts[LENGTHS.index(100)]
    pre, dec = await deployment.pd(f"bs-again-{prefill}-{decode}", ids, prefill=prefill, decode=decode)
    assert tokens(pre + dec) == refs[LENGTHS.index(100)]
    assert 0 < dec[0].timings["kv_bytes"] < results[LENGTHS.index(100)][1][0].timings["kv_bytes"]
    assert (await deployment.stats(decode)).kv_transports[prefill] == transport
    await deployment.wait_idle(prefill, decode, "both")


async def test_text_prompt_through_pd(deployment: Deployment):
    sampling = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ref = await deployment.run("both", Generate("text-ref", sampling, prompt="The quick brown fox jumps over it"))
    pre = await deployment.run("prefill", Generate("text-pd", sampling, prompt="The quick brown fox jumps over it",
                                                   do_remote_decode=True))
    dec = await deployment.decode_leg("decode", "text-pd", pre[0].prompt_token_ids, pre[-1].kv_transfer, sampling)
    assert tokens(pre + dec) == tokens(ref)
    assert "".join(o.text for o in pre + dec) == "".join(o.text for o in ref)


async def test_32_concurrent_requests_all_correct(deployment: Deployment):
    prompts = [prompt_ids(1 + (37 * i) % 200, seed=1000 + i) for i in range(32)]
    refs = await asyncio.gather(*(deployment.reference(ids) for ids in prompts))
    results = await asyncio.gather(*(deployment.pd(f"conc-{i}", ids) for i, ids in enumerate(prompts)))
    for i, (ref, (pre, dec)) in enumerate(zip(refs, results)):
        assert tokens(pre + dec) == ref, f"request {i}"
    await deployment.wait_idle("prefill", "decode", "both")


async def test_aborts_leave_no_blocks_behind(deployment: Deployment):
    ids = prompt_ids(80, seed=2)
    pre = await deployment.prefill_leg("prefill", "abort-pinned", ids, LONG)
    assert (await deployment.stats("prefill")).load.kv_blocks_pinned == 5
    assert isinstance(await deployment.client("prefill").call(Abort("abort-pinned")), Ack)
    await deployment.wait_idle("prefill", timeout_s=5.0)

    pre = await deployment.prefill_leg("prefill", "abort-decode", ids, LONG)
    outs = []
    async for out in deployment.client("decode").stream(Generate("abort-decode", LONG, prompt_token_ids=ids,
                                                                 remote_prefill=pre[-1].kv_transfer)):
        outs.append(out)
        if len(outs) == 2:
            await deployment.client("decode").call(Abort("abort-decode"))
    assert outs[-1].finish_reason == "abort"
    await deployment.wait_idle("prefill", "decode", timeout_s=10.0)


async def test_expired_lease_frees_unread_blocks(deployment: Deployment):
    pre = await deployment.prefill_leg("prefill", "never-read", prompt_ids(64, seed=3))
    assert pre[-1].kv_transfer.lease_expiry - time.time() <= LEASE_S
    assert (await deployment.stats("prefill")).load.kv_blocks_pinned == 4
    await deployment.wait_idle("prefill", timeout_s=LEASE_S + 10.0)


async def test_decode_sigkilled_mid_transfer_leaves_prefill_idle(deployment: Deployment):
    procs = deployment.procs
    first_decode_token = asyncio.Event()
    clients = EngineDriver(deployment.endpoints, timeout_s=10.0)  # a leg sent after the kill times out

    async def one(i: int) -> None:
        ids = prompt_ids(300, seed=2000 + i)
        pre = await clients.prefill_leg("prefill", f"killed-{i}", ids, LONG)
        async for _ in clients.client("decode").stream(Generate(f"killed-{i}", LONG, prompt_token_ids=ids,
                                                                remote_prefill=pre[-1].kv_transfer)):
            first_decode_token.set()

    tasks = [asyncio.create_task(one(i)) for i in range(8)]
    try:
        await asyncio.wait_for(first_decode_token.wait(), 60.0)
        assert await procs.stop("decode", signal.SIGKILL) == -signal.SIGKILL
        results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await clients.close()
    assert any(isinstance(r, BusError) for r in results), results  # the streams in flight broke
    assert all(r is None or isinstance(r, BusError) for r in results), results
    # Unread transfers expire, read ones were released: prefill ends with nothing pinned or used.
    await deployment.wait_idle("prefill", timeout_s=LEASE_S + 15.0)

    # A fresh decode takes over.
    procs.start_engine("decode-2", "decode", *ENGINE_FLAGS)
    await procs.wait_registered("decode-2")
    deployment.endpoints["decode-2"] = procs.procs["decode-2"].endpoint
    ids = prompt_ids(40, seed=4)
    pre, dec = await deployment.pd("after-kill", ids, decode="decode-2")
    assert tokens(pre + dec) == await deployment.reference(ids)
    await deployment.wait_idle("prefill", "decode-2")


async def test_sigterm_exits_zero_and_deregisters(deployment: Deployment):
    procs = deployment.procs
    # The colocated engine goes down with a request in flight: the stream ends with "abort".
    stream = deployment.client("both").stream(Generate("in-flight", SamplingParams(max_tokens=4000, ignore_eos=True,
                                                                                      temperature=0.0),
                                                       prompt_token_ids=prompt_ids(10, seed=5)))
    assert (await anext(stream)).finish_reason is None
    for name in ("both", "prefill", "decode-2"):
        started = time.monotonic()
        procs.procs[name].signal(signal.SIGTERM)
        if name == "both":
            outs = [out async for out in stream]
            assert outs[-1].finish_reason == "abort"
        assert await procs.wait_exit(name, timeout_s=SHUTDOWN_S + 15.0) == 0, procs.procs[name].log_tail()
        assert time.monotonic() - started < SHUTDOWN_S + 15.0
        assert name not in await procs.instances()
    assert await procs.stop("registry") == 0
