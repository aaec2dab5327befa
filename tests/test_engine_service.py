"""L2: engine services (prefill, decode, both) in one event loop over real ZMQ and Mooncake TCP on loopback.

One set of services is shared by the module (loading an engine costs seconds on
two cores); tests use distinct request ids and prompts, and every test that
moves blocks waits until the engines it touched are idle again.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
import pytest
import pytest_asyncio

from bench.engine_driver import GREEDY, EngineDriver, prompt_ids, tokens
from bench.processes import free_port
from common.bus import BusClient
from common.engine.engine import LLMEngine
from common.engine.kv_cache import KVCache
from common.engine_service import ColocatedRole, EngineService, EngineServiceConfig
from common.engine_service.service import serve
from common.errors import PeerError
from common.messages import (
    Abort,
    Ack,
    Capacity,
    Fingerprint,
    Generate,
    InstanceList,
    KVTransferParams,
    ListInstances,
    SamplingParams,
    TokenOutput,
)
from services.decode import DecodeHandoff
from services.prefill import PrefillRole
from services.registry import Registry, RegistryConfig
from tests.procs import eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

NUM_BLOCKS = 64
BLOCK = 16
ROLES = {"prefill": PrefillRole, "decode": DecodeHandoff, "both": ColocatedRole}
IDLE_S = 60.0  # generous: CI is a loaded 2-core machine


class Cluster(EngineDriver):
    """The module's services and bus clients to them by name."""

    def __init__(self, registry: Registry, services: dict[str, EngineService]):
        super().__init__({name: s.request_endpoint for name, s in services.items()})
        self.registry = registry
        self.services = services

    async def wait_idle(self, *names: str, timeout_s: float = IDLE_S) -> None:
        await super().wait_idle(*names, timeout_s=timeout_s)

    async def stats_until(self, name: str, check, timeout_s: float = IDLE_S) -> None:
        """Poll ``name``'s stats until ``check(stats)`` holds."""
        await eventually(lambda: self._stats_match(name, check), timeout=timeout_s)

    async def _stats_match(self, name: str, check) -> bool:
        return check(await self.stats(name))


def service_config(registry: str, role: str, name: str, **over) -> EngineServiceConfig:
    base = dict(
        role=role, instance_id=name, registry=registry, model="demo", dtype="float32", device="cpu",
        num_kv_blocks=NUM_BLOCKS, kv_transport="tcp", kv_handshake_timeout_s=2.0, kv_rpc_timeout_s=2.0,
        kv_renew_interval_s=0.5, kv_lease_seconds=30.0, kv_lease_sweep_interval_s=0.1, shutdown_timeout_s=3.0,
    )  # fmt: skip
    cfg = EngineServiceConfig(**{**base, **over})
    cfg.validate()
    return cfg


@asynccontextmanager
async def running_cluster(specs: dict[str, dict]) -> AsyncIterator[Cluster]:
    """A registry and one service per ``specs`` entry (name -> ``service_config`` overrides, ``role``
    included; ``_`` in a name becomes ``-`` in its instance id), started in order, shut down after."""
    registry = Registry(RegistryConfig(bind="tcp://127.0.0.1:0"))
    await registry.start()
    loop = asyncio.get_running_loop()
    services: dict[str, EngineService] = {}
    try:
        for name, spec in specs.items():
            cfg = service_config(registry.endpoint, name=name.replace("_", "-"), **spec)
            service = EngineService(cfg, await loop.run_in_executor(None, LLMEngine, cfg), ROLES[cfg.role])
            services[name] = service
            await service.start()
        cluster = Cluster(registry, services)
        try:
            yield cluster
        finally:
            await cluster.close()
    finally:
        for service in services.values():
            await service.shutdown()
        await registry.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster():
    async with running_cluster({
        "prefill": dict(role="prefill"),
        "decode": dict(role="decode"),
        "decode_fail": dict(role="decode", kv_load_failure_policy="fail"),
        "both": dict(role="both", shutdown_timeout_s=1.0, num_kv_blocks=256),  # room for a long stream
        "short_prefill": dict(role="prefill", kv_lease_seconds=1.0),
    }) as cluster:
        yield cluster


# --------------------------------------------------------------------------- registration, stats


async def test_registration_carries_fingerprint_and_capacity(cluster: Cluster):
    bus = BusClient(cluster.registry.endpoint, timeout=30.0)
    try:
        reply = await bus.call(ListInstances())
    finally:
        await bus.close()
    assert isinstance(reply, InstanceList)
    listed = {i.id: i for i in reply.instances}
    expected_fp = Fingerprint(model="demo", dtype="float32", block_size=BLOCK, num_layers=4, num_kv_heads=4,
                              head_dim=32, kv_layout=KVCache.LAYOUT, transfer_backend="mooncake")
    for service in cluster.services.values():
        inst = listed[service.instance_id]
        assert inst.role == service.config.role
        assert inst.fingerprint == expected_fp
        assert inst.capacity == Capacity(max_num_seqs=64, num_kv_blocks=service.config.num_kv_blocks,
                                         max_model_len=4096)
        assert inst.request_endpoint == service.request_endpoint
        assert inst.kv_endpoint == service.kv_endpoint
        assert inst.request_endpoint.startswith("tcp://127.0.0.1:") and not inst.request_endpoint.endswith(":0")


async def test_get_stats(cluster: Cluster):
    for name, service in cluster.services.items():
        s = await cluster.stats(name)
        assert (s.instance_id, s.role) == (service.instance_id, service.config.role)
        assert s.load.kv_blocks_total == service.config.num_kv_blocks


# --------------------------------------------------------------------------- colocated and prefill leg


async def test_colocated_streams_tokens_text_logprobs_and_usage(cluster: Cluster):
    sampling = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2)
    outs = await cluster.run("both", Generate("colo-1", sampling, prompt="Hello there, streaming world"))
    assert len(outs) >= 2, "tokens must stream as they are produced, not in one reply"
    assert outs[0].prompt_token_ids
    assert all(out.finish_reason is None for out in outs[:-1])
    final = outs[-1]
    assert final.finish_reason == "length"
    assert len(tokens(outs)) == 6
    assert final.usage.prompt_tokens == len(outs[0].prompt_token_ids)
    assert final.usage.completion_tokens == 6
    for out in outs:
        assert len(out.logprobs or []) == len(out.token_ids)
        for lp, tok in zip(out.logprobs or [], out.token_ids):
            assert lp.token_id == tok and len(lp.top) == 2 and lp.logprob <= 0.0
    detok = cluster.services["both"].core.tokenizer
    assert "".join(out.text for out in outs) == detok.decode(tokens(outs))


async def test_prefill_leg_returns_first_token_and_blocks_covering_the_prompt(cluster: Cluster):
    ids = prompt_ids(40, seed=1)
    ref = await cluster.reference(ids)
    pre = await cluster.prefill_leg("prefill", "pre-1", ids)
    final = pre[-1]
    assert final.finish_reason == "remote_decode"
    assert tokens(pre) == ref[:1]
    params = final.kv_transfer
    prefill = cluster.services["prefill"]
    assert params.engine_id == prefill.instance_id and params.kv_endpoint == prefill.kv_endpoint
    assert params.num_tokens == 40 and len(params.block_ids) == 3  # ceil(40 / 16)
    assert params.first_token_id == ref[0]
    assert params.lease_expiry > time.time()
    await cluster.stats_until("prefill", lambda s: (s.load.kv_blocks_pinned, s.num_transfers_active) == (3, 1))
    dec = await cluster.decode_leg("decode", "pre-1", ids, params)
    assert tokens(pre + dec) == ref
    await cluster.wait_idle("prefill", "decode")


# --------------------------------------------------------------------------- P/D equals colocated


@pytest.mark.parametrize("length", [5, 16, 32, 47, 300])
async def test_pd_output_token_identical_to_colocated(cluster: Cluster, length: int):
    ids = prompt_ids(length, seed=100 + length)
    ref = await cluster.reference(ids)
    pre, dec = await cluster.pd(f"pd-{length}", ids)
    assert tokens(pre + dec) == ref
    assert dec[-1].finish_reason == "length"
    assert dec[-1].usage.completion_tokens == GREEDY.max_tokens
    timings = dec[0].timings
    token_bytes = cluster.services["decode"].layout.block_bytes // BLOCK
    assert timings["kv_bytes"] == length * token_bytes  # the prompt's positions, a partial last block's only
    assert timings["kv_transfer_s"] > 0 and timings["first_decode_step_s"] > 0
    await cluster.wait_idle("prefill", "decode")


async def test_pd_seeded_sampling_matches_colocated(cluster: Cluster):
    """Decode continues the request's seeded generator past the draw prefill made for token 1."""
    ids = prompt_ids(37, seed=7)
    sampling = SamplingParams(max_tokens=10, temperature=0.8, top_k=20, seed=1234, ignore_eos=True)
    ref = await cluster.run("both", Generate("seeded-ref", sampling, prompt_token_ids=ids))
    pre, dec = await cluster.pd("seeded-pd", ids, sampling)
    assert tokens(pre + dec) == tokens(ref)
    await cluster.wait_idle("prefill", "decode")


async def test_pd_logprobs_match_colocated(cluster: Cluster):
    ids = prompt_ids(37, seed=7)
    sampling = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2)
    ref = await cluster.run("both", Generate("logprobs-ref", sampling, prompt_token_ids=ids))
    pre, dec = await cluster.pd("logprobs-pd", ids, sampling)
    assert tokens(pre + dec) == tokens(ref)
    ref_lps = [lp for out in ref for lp in out.logprobs]
    pd_lps = [lp for out in pre + dec for lp in out.logprobs]
    assert pre[-1].kv_transfer.first_token_logprob == ref_lps[0]
    assert [lp.token_id for lp in pd_lps] == [lp.token_id for lp in ref_lps]
    for a, b in zip(pd_lps, ref_lps):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    await cluster.wait_idle("prefill", "decode")


async def test_decode_prefix_cache_hit_reads_fewer_bytes(cluster: Cluster):
    ids = prompt_ids(40, seed=2)
    ref = await cluster.reference(ids)
    pre1, dec1 = await cluster.pd("prefix-1", ids)
    pre2, dec2 = await cluster.pd("prefix-2", ids)
    assert tokens(pre1 + dec1) == tokens(pre2 + dec2) == ref
    token_bytes = cluster.services["decode"].layout.block_bytes // BLOCK
    assert dec1[0].timings["kv_bytes"] == 40 * token_bytes
    assert dec2[0].timings["kv_bytes"] == (40 - 2 * BLOCK) * token_bytes  # the two full blocks are decode-side hits
    await cluster.wait_idle("prefill", "decode")


# --------------------------------------------------------------------------- leak prevention


async def test_abort_releases_prefill_pinned_blocks(cluster: Cluster):
    pre = await cluster.prefill_leg("prefill", "abort-pinned", prompt_ids(50, seed=3))
    assert pre[-1].kv_transfer is not None
    await cluster.stats_until("prefill", lambda s: s.load.kv_blocks_pinned == 4)
    assert isinstance(await cluster.client("prefill").call(Abort("abort-pinned")), Ack)
    await cluster.wait_idle("prefill", timeout_s=20.0)  # the Abort, long before the 30 s lease


async def test_lease_expiry_frees_unread_blocks_then_decode_recomputes(cluster: Cluster, caplog):
    ids = prompt_ids(33, seed=4)
    ref = await cluster.reference(ids)
    pre = await cluster.prefill_leg("short_prefill", "lease-1", ids)
    assert len(pre[-1].kv_transfer.block_ids) == 3
    await cluster.wait_idle("short_prefill", timeout_s=20.0)  # 1 s lease, nobody reads
    assert f"KV lease {pre[-1].kv_transfer.transfer_id} expired unread" in caplog.text
    # A decode that gets the stale params finds the lease gone and recomputes the prompt.
    dec = await cluster.decode_leg("decode", "lease-1", ids, pre[-1].kv_transfer)
    assert tokens(pre + dec) == ref
    assert dec[0].timings.get("kv_failed") == 1.0
    await cluster.wait_idle("short_prefill", "decode")


def at_dead_endpoint(params: KVTransferParams) -> KVTransferParams:
    """The same transfer, but at a KV endpoint nothing listens on (a prefill that died)."""
    return msgspec.structs.replace(params, engine_id="dead-prefill", kv_endpoint=f"tcp://127.0.0.1:{free_port()}")


async def test_dead_prefill_with_recompute_policy_gives_identical_output(cluster: Cluster):
    ids = prompt_ids(45, seed=5)
    ref = await cluster.reference(ids)
    pre = await cluster.prefill_leg("prefill", "dead-1", ids)
    dec = await cluster.decode_leg("decode", "dead-1", ids, at_dead_endpoint(pre[-1].kv_transfer))
    assert tokens(pre + dec) == ref
    assert dec[0].timings["kv_failed"] == 1.0
    await cluster.client("prefill").call(Abort("dead-1"))  # what the gateway does after a failed leg
    await cluster.wait_idle("prefill", "decode")


async def test_dead_prefill_with_fail_policy_is_a_typed_error(cluster: Cluster):
    ids = prompt_ids(45, seed=6)
    pre = await cluster.prefill_leg("prefill", "dead-2", ids)
    with pytest.raises(PeerError) as err:
        await cluster.decode_leg("decode_fail", "dead-2", ids, at_dead_endpoint(pre[-1].kv_transfer))
    assert err.value.code == "kv_transfer_failed"
    await cluster.client("prefill").call(Abort("dead-2"))
    await cluster.wait_idle("prefill", "decode_fail")


async def test_fail_policy_decode_succeeds_when_the_read_works(cluster: Cluster):
    ids = prompt_ids(20, seed=8)
    ref = await cluster.reference(ids)
    pre, dec = await cluster.pd("fail-ok", ids, decode="decode_fail")
    assert tokens(pre + dec) == ref
    await cluster.wait_idle("prefill", "decode_fail")


# --------------------------------------------------------------------------- bad input


async def expect_invalid(cluster: Cluster, name: str, msg: Generate, param: str) -> None:
    with pytest.raises(PeerError) as err:
        await cluster.run(name, msg)
    assert (err.value.code, err.value.param) == ("invalid_request", param), err.value


async def test_bad_inputs_are_invalid_request_naming_the_param(cluster: Cluster):
    ids = prompt_ids(20, seed=9)
    params = KVTransferParams(engine_id="x", kv_endpoint="tcp://127.0.0.1:1", transfer_id="x/1", block_ids=[0, 1],
                              num_tokens=20, first_token_id=5, lease_expiry=time.time() + 30)
    await expect_invalid(cluster, "decode", Generate("bad-1", GREEDY, prompt_token_ids=ids, do_remote_decode=True),
                         "do_remote_decode")
    await expect_invalid(cluster, "both", Generate("bad-2", GREEDY, prompt_token_ids=ids, do_remote_decode=True),
                         "do_remote_decode")
    await expect_invalid(cluster, "prefill", Generate("bad-3", GREEDY, prompt_token_ids=ids, remote_prefill=params),
                         "remote_prefill")
    await expect_invalid(cluster, "both", Generate("bad-4", GREEDY, prompt="hi", prompt_token_ids=ids), "prompt")
    await expect_invalid(cluster, "both", Generate("bad-5", GREEDY), "prompt")
    await expect_invalid(cluster, "both", Generate("bad-6", GREEDY, prompt_token_ids=prompt_ids(5000, seed=10)),
                         "prompt")
    await expect_invalid(cluster, "both", Generate("bad-7", SamplingParams(max_tokens=0), prompt_token_ids=ids),
                         "max_tokens")
    await expect_invalid(cluster, "both", Generate("bad-8", GREEDY, prompt_token_ids=[1, 99999]), "prompt_token_ids")
    await cluster.wait_idle("both", "decode", "prefill")


async def test_decode_counts_the_params_block_ids_in_the_prefill_block_size(cluster: Cluster):
    ids = prompt_ids(20, seed=9)  # 2 blocks of 16 tokens, 3 of 8
    params = KVTransferParams(engine_id="x", kv_endpoint="tcp://127.0.0.1:1", transfer_id="x/2", block_ids=[0, 1],
                              num_tokens=20, first_token_id=5, lease_expiry=time.time() + 30, block_size=8)
    with pytest.raises(PeerError) as err:
        await cluster.run("decode", Generate("bad-bs", GREEDY, prompt_token_ids=ids, remote_prefill=params))
    assert (err.value.code, err.value.param) == ("invalid_request", "remote_prefill")
    assert "2 block ids for 20 tokens in blocks of 8 (need 3)" in err.value.message
    await cluster.wait_idle("decode")


async def test_decode_refusing_params_releases_the_prefill_blocks(cluster: Cluster):
    ids = prompt_ids(30, seed=11)
    pre = await cluster.prefill_leg("prefill", "mismatch", ids)
    await cluster.stats_until("prefill", lambda s: s.load.kv_blocks_pinned == 2)
    await expect_invalid(cluster, "decode", Generate("mismatch", GREEDY, prompt_token_ids=ids[:-1],
                                                     remote_prefill=pre[-1].kv_transfer), "remote_prefill")
    await cluster.wait_idle("prefill", "decode", timeout_s=20.0)  # ReleaseKV, long before the 30 s lease


async def test_same_request_id_twice_on_prefill_is_refused_while_pinned(cluster: Cluster):
    ids = prompt_ids(20, seed=12)
    await cluster.prefill_leg("prefill", "twice", ids)
    await expect_invalid(cluster, "prefill", Generate("twice", GREEDY, prompt_token_ids=ids, do_remote_decode=True),
                         "request_id")
    await cluster.client("prefill").call(Abort("twice"))
    await cluster.wait_idle("prefill")


# --------------------------------------------------------------------------- cancellation and abort


LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)


async def test_cancelled_client_stream_mid_decode_aborts_the_engine_request(cluster: Cluster):
    ids = prompt_ids(40, seed=13)
    pre = await cluster.prefill_leg("prefill", "cancel-1", ids, LONG)
    stream = cluster.client("decode").stream(Generate("cancel-1", LONG, prompt_token_ids=ids,
                                                      remote_prefill=pre[-1].kv_transfer))
    received = 0
    async for out in stream:
        assert out.finish_reason is None
        received += 1
        if received == 3:
            break
    await stream.aclose()
    await cluster.wait_idle("decode", "prefill")


async def test_abort_mid_decode_ends_the_stream_with_abort(cluster: Cluster):
    ids = prompt_ids(40, seed=14)
    pre = await cluster.prefill_leg("prefill", "abort-dec", ids, LONG)
    outs: list[TokenOutput] = []
    async for out in cluster.client("decode").stream(Generate("abort-dec", LONG, prompt_token_ids=ids,
                                                              remote_prefill=pre[-1].kv_transfer)):
        outs.append(out)
        if len(outs) == 2:
            assert isinstance(await cluster.client("decode").call(Abort("abort-dec")), Ack)
    assert outs[-1].finish_reason == "abort"
    assert len(tokens(outs)) < LONG.max_tokens
    await cluster.wait_idle("decode", "prefill")


async def test_concurrent_pd_requests_all_match(cluster: Cluster):
    prompts = [prompt_ids(n, seed=200 + n) for n in (3, 16, 17, 31, 64, 90, 120, 150)]
    refs = await asyncio.gather(*(cluster.reference(ids) for ids in prompts))
    results = await asyncio.gather(*(cluster.pd(f"conc-{i}", ids) for i, ids in enumerate(prompts)))
    for ref, (pre, dec) in zip(refs, results):
        assert tokens(pre + dec) == ref
    await cluster.wait_idle()


async def test_a_failed_engine_fails_its_requests_and_refuses_new_ones(cluster: Cluster):
    """A step that raises kills the engine thread: the running request gets a typed error (not a
    normal finish), new requests are refused as retryable, and ``failed`` tells serve() to exit."""
    cfg = service_config(cluster.registry.endpoint, "both", "doomed")
    engine = await asyncio.get_running_loop().run_in_executor(None, LLMEngine, cfg)

    def broken_step():
        raise RuntimeError("simulated device error")

    engine.step = broken_step
    service = EngineService(cfg, engine, ColocatedRole)
    await service.start()
    client = EngineDriver({"doomed": service.request_endpoint})
    try:
        with pytest.raises(PeerError) as err:
            await client.run("doomed", Generate("doomed-1", GREEDY, prompt_token_ids=[5, 6, 7]))
        assert err.value.code == "internal" and "simulated device error" in err.value.message
        assert service.engine.failed is not None
        with pytest.raises(PeerError) as err:
            await client.run("doomed", Generate("doomed-2", GREEDY, prompt_token_ids=[5, 6, 7]))
        assert err.value.code == "shutting_down"
    finally:
        await client.close()
        await service.shutdown()


# --------------------------------------------------------------------------- shutdown (last: stops services)


async def test_decode_cancelled_during_the_read_leaves_nothing_behind(cluster: Cluster):
    """Cancelled while its KV read waits (here on a handshake nobody answers): the request's
    blocks and its output stream are gone, so the same id runs again on that engine."""
    ids = prompt_ids(30, seed=16)
    ref = await cluster.reference(ids)
    pre = await cluster.prefill_leg("prefill", "cancel-read", ids)
    leg = asyncio.create_task(cluster.decode_leg("decode", "cancel-read", ids, at_dead_endpoint(pre[-1].kv_transfer)))
    decode = cluster.services["decode"]
    await eventually(lambda: "cancel-read" in decode.role.reading, timeout=IDLE_S)
    leg.cancel()
    await asyncio.gather(leg, return_exceptions=True)
    await cluster.wait_idle("decode")
    dec = await cluster.decode_leg("decode", "cancel-read", ids, pre[-1].kv_transfer)
    assert tokens(pre + dec) == ref
    await cluster.wait_idle("prefill", "decode")


async def test_shutdown_aborts_in_flight_streams_and_deregisters(cluster: Cluster):
    both = cluster.services["both"]
    stream = cluster.client("both").stream(Generate("shutdown-1", SamplingParams(max_tokens=4000, ignore_eos=True,
                                                                                   temperature=0.0),
                                                    prompt_token_ids=prompt_ids(10, seed=15)))
    first = await anext(stream)
    assert first.finish_reason is None
    started = time.monotonic()
    shutdown = asyncio.create_task(both.shutdown())
    await eventually(lambda: not both.accepting, timeout=IDLE_S)
    with pytest.raises(PeerError) as err:  # draining: new work is refused
        await cluster.run("both", Generate("shutdown-2", GREEDY, prompt_token_ids=[5, 6]))
    assert err.value.code == "shutting_down"
    outs = [out async for out in stream]  # the stream ends (no hang) once the drain timeout passes
    assert outs[-1].finish_reason == "abort"
    await shutdown
    assert time.monotonic() - started < both.config.shutdown_timeout_s + 5.0
    bus = BusClient(cluster.registry.endpoint, timeout=30.0)
    try:
        listed = {i.id for i in (await bus.call(ListInstances())).instances}
    finally:
        await bus.close()
    assert both.instance_id not in listed
    assert {s.instance_id for n, s in cluster.services.items() if n != "both"} <= listed


async def test_a_served_engine_freezes_what_it_built_out_of_the_collections():
    """``serve`` (one engine per process) moves what it built out of the collector's generations once up."""
    registry = Registry(RegistryConfig(bind="tcp://127.0.0.1:0"))
    await registry.start()
    gc.unfreeze()
    serving = asyncio.create_task(serve(service_config(registry.endpoint, "both", "frozen"), ROLES))
    try:
        await eventually(lambda: gc.get_freeze_count() > 0 or serving.done(), timeout=60)
        assert not serving.done() and gc.get_freeze_count() > 0
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        gc.unfreeze()
        await registry.close()
