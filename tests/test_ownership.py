"""Issue 15, ownership: nobody but a request's sender may abort it, nobody but a transfer's reader may renew or
release it, and no id can be guessed.

The attacker is another bus client on loopback (its own connection, so its own identity at the ROUTER) or
another HTTP client.  The engines are real services over real ZMQ and Mooncake TCP, as in
``test_engine_service``; the HTTP tests run the real gateway over fake engines.
"""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest
import pytest_asyncio

from bench.engine_driver import GREEDY, prompt_ids, tokens
from bench.fakes import FakeCluster
from common.bus import BusClient
from common.messages import Abort, Ack, Generate, LeaseRenewed, ReleaseKV, RenewLease, SamplingParams
from services.gateway.request_ids import RequestIds
from tests.procs import eventually
from tests.test_engine_service import Cluster, running_cluster

HEX128 = re.compile(r"[0-9a-f]{32}")
LONG = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)


# --------------------------------------------------------------------------- gateway ids


def test_gateway_handles_are_random_and_a_client_label_is_only_a_label():
    ids = RequestIds()
    fresh = [ids.reserve(None) for _ in range(64)]
    handles = [i.handle for i in fresh]
    assert all(HEX128.fullmatch(h) for h in handles) and len(set(handles)) == 64
    assert all(i.label == i.handle for i in fresh)  # no label given: the client sees the handle
    numbers = sorted(int(h, 16) for h in handles)
    assert max(b - a for a, b in zip(numbers, numbers[1:])) > 2**64  # not a counter under a fixed prefix
    first, second = ids.reserve("victim-0"), ids.reserve("victim-0")  # duplicate labels are allowed (vLLM)
    assert first.label == second.label == "victim-0" and first.handle != second.handle
    assert "victim-0" not in {first.handle, second.handle} and len(ids) == 66


async def test_an_x_request_id_naming_another_requests_choice_does_not_touch_it():
    """The victim's ``n=2`` request runs under its label ``victim``; attackers send ``victim-0`` and ``victim``."""
    async with FakeCluster(prefill=1, decode=1, token_delay_s=0.02) as c:
        async with httpx.AsyncClient(base_url=c.url, timeout=30) as h:
            victim_body = {"model": "fake", "prompt": "victim", "max_tokens": 40, "n": 2, "temperature": 0}
            async with h.stream("POST", "/v1/completions", json={**victim_body, "stream": True},
                                headers={"X-Request-Id": "victim"}) as victim:
                lines = victim.aiter_lines()
                async for line in lines:
                    if line.startswith("data: {"):
                        break  # the victim's choices are running
                attacks = await asyncio.gather(*(
                    h.post("/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 2},
                           headers={"X-Request-Id": label}) for label in ("victim-0", "victim-1", "victim")))
                events = [json.loads(line[6:]) async for line in lines if line.startswith("data: {")]
            assert not [e for e in events if "error" in e]
            finishes = {ch["index"]: ch["finish_reason"] for e in events for ch in e["choices"] if ch["finish_reason"]}
            assert finishes == {0: "length", 1: "length"}
            assert [(r.status_code, r.headers["x-request-id"]) for r in attacks] == [
                (200, "victim-0"), (200, "victim-1"), (200, "victim")]  # labels echoed; a duplicate one runs too
            handles = [g.request_id for e in c.engines for g in e.received]
            assert all(re.fullmatch(r"[0-9a-f]{32}(-[01])?", h) for h in handles)
            assert not any(a for e in c.engines for a in e.aborts)


# --------------------------------------------------------------------------- engines


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster():
    async with running_cluster({"prefill": dict(role="prefill"),
                                "pinning": dict(role="prefill", kv_lease_seconds=1.0, kv_lease_max_seconds=2.0)}
                               ) as cluster:
        yield cluster


@pytest_asyncio.fixture(loop_scope="module")
async def stranger():
    """Bus clients of an attacker on loopback, by endpoint: each its own connection."""
    clients: list[BusClient] = []

    def connect(endpoint: str) -> BusClient:
        clients.append(BusClient(endpoint, name="stranger", timeout=10.0))
        return clients[-1]

    yield connect
    for client in clients:
        await client.close()


ON_CLUSTER = pytest.mark.asyncio(loop_scope="module")  # the module's services live in the module's loop


@ON_CLUSTER
async def test_a_stranger_cannot_abort_a_running_request(cluster: Cluster, stranger):
    ids = prompt_ids(20, seed=71)
    stream = asyncio.ensure_future(cluster.run("prefill", Generate("victim-run", LONG, prompt_token_ids=ids)))
    await cluster.stats_until("prefill", lambda s: s.load.running == 1)
    assert isinstance(await stranger(cluster.endpoints["prefill"]).call(Abort("victim-run")), Ack)
    outs = await stream
    assert outs[-1].finish_reason == "length" and len(tokens(outs)) == LONG.max_tokens
    await cluster.wait_idle("prefill")


@ON_CLUSTER
async def test_only_the_sender_may_abort_and_only_the_reader_may_renew_or_release(cluster: Cluster, stranger):
    pre = await cluster.prefill_leg("prefill", "victim-pin", prompt_ids(40, seed=72))
    params = pre[-1].kv_transfer
    assert HEX128.fullmatch(params.transfer_id) and "victim-pin" not in params.transfer_id
    attacker = stranger(cluster.endpoints["prefill"])
    assert isinstance(await attacker.call(Abort("victim-pin")), Ack)  # answered as an unknown id...
    reader = stranger(params.kv_endpoint)  # the decode the params went to: the first to claim the transfer
    claimed = await reader.call(RenewLease([params.transfer_id]))
    assert isinstance(claimed, LeaseRenewed) and claimed.block_ids == {params.transfer_id: params.block_ids}
    thief = stranger(params.kv_endpoint)
    assert await thief.call(RenewLease([params.transfer_id])) == LeaseRenewed({}, {})  # ...as is another's lease
    assert isinstance(await thief.call(ReleaseKV([params.transfer_id])), Ack)
    stats = await cluster.stats("prefill")
    assert stats.load.kv_blocks_pinned == len(params.block_ids) and stats.num_transfers_active == 1
    assert isinstance(await reader.call(ReleaseKV([params.transfer_id])), Ack)
    await cluster.wait_idle("prefill")


@ON_CLUSTER
async def test_a_stranger_abort_does_not_release_a_pinned_transfer_but_its_sender_does(cluster: Cluster, stranger):
    pre = await cluster.prefill_leg("prefill", "victim-abort", prompt_ids(40, seed=73))
    assert pre[-1].kv_transfer is not None
    held = (await cluster.stats("prefill")).num_transfers_active
    await stranger(cluster.endpoints["prefill"]).call(Abort("victim-abort"))
    assert (await cluster.stats("prefill")).num_transfers_active == held
    await cluster.client("prefill").call(Abort("victim-abort"))
    await cluster.wait_idle("prefill")


@ON_CLUSTER
async def test_a_pin_flood_with_renewals_ends_in_blocks_freed_at_the_lease_limit(cluster: Cluster, stranger):
    """The attacker pins blocks with its own Generates and renews them (it is their first reader); it also
    renews a victim's transfer, which the victim's decode claimed and then left.  Renewals never outlive
    ``--kv-lease-max-seconds``; the stranger's renewals of the victim's transfer do nothing."""
    attacker = stranger(cluster.endpoints["pinning"])
    legs = [[out async for out in attacker.stream(Generate(f"pin-{i}", GREEDY, prompt_token_ids=prompt_ids(40, 80 + i),
                                                           do_remote_decode=True))] for i in range(3)]
    own = [outs[-1].kv_transfer.transfer_id for outs in legs]
    victim = (await cluster.prefill_leg("pinning", "victim-lease", prompt_ids(40, seed=90)))[-1].kv_transfer
    assert victim.transfer_id in (await stranger(victim.kv_endpoint).call(RenewLease([victim.transfer_id]))).expiry
    side = stranger(victim.kv_endpoint)
    renewed: list[int] = []

    async def renew_forever() -> None:
        while True:
            reply = await side.call(RenewLease([*own, victim.transfer_id]))
            renewed.append(len(reply.expiry))
            await asyncio.sleep(0.2)

    renewing = asyncio.create_task(renew_forever())
    try:
        await eventually(lambda: _unpinned(cluster, "pinning"), timeout=20)
    finally:
        renewing.cancel()
        await asyncio.gather(renewing, return_exceptions=True)
    assert max(renewed) == len(own)  # the victim's transfer was never renewed for the stranger
    await cluster.wait_idle("pinning")


async def _unpinned(cluster: Cluster, name: str) -> bool:
    stats = await cluster.stats(name)
    return stats.load.kv_blocks_pinned == 0 and stats.num_transfers_active == 0
