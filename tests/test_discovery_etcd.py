"""Discovery on etcd (``--registry etcd://...``) against real etcd members on loopback.

Engines register through ``EtcdRegistration`` (the fake engines and the engine service use the same
``registration_for``), the gateway follows through ``EtcdWatcher``; leases are 1 s so expiry is quick.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys

import msgspec
import openai
import pytest

pytest.importorskip("aetcd", reason="the etcd extra (pip install 'pdserve[etcd]') is not installed")
if shutil.which("etcd") is None:
    pytest.skip("etcd is not installed (apt-get install etcd-server; make test installs it)", allow_module_level=True)

from bench.etcd_cluster import EtcdCluster  # noqa: E402
from bench.fakes import FakeCluster  # noqa: E402
from services.gateway.config import GatewayConfig  # noqa: E402
from services.up import Stack, UpConfig  # noqa: E402
from common.config import ConfigError  # noqa: E402
from common.discovery import registration_for, url_problem, watcher_for  # noqa: E402
from common.discovery.etcd_url import EtcdURL  # noqa: E402
from common.discovery.etcd_watch import EtcdWatcher  # noqa: E402
from common.errors import PeerError  # noqa: E402
from common.messages import Load  # noqa: E402
from test_registry import make_instance  # noqa: E402
from tests.procs import REPO, eventually  # noqa: E402


@pytest.fixture
async def etcd():
    async with EtcdCluster(1) as cluster:
        yield cluster


def log_of(watcher) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    watcher.add_listener(lambda change, instance: seen.append((change, instance.id)))
    return seen


def test_urls_name_their_members_prefix_and_lease():
    url = EtcdURL.parse("etcd://10.0.0.1:2379,etcd-2:2379/prod/pd?lease_ttl_s=5")
    assert url.endpoints == (("10.0.0.1", 2379), ("etcd-2", 2379))
    assert (url.prefix, url.lease_ttl_s, url.key("p0")) == ("/prod/pd", 5, b"/prod/pd/instances/p0")
    assert EtcdURL.parse("etcd://127.0.0.1:2379").prefix == "/pdserve"
    for bad in ("etcd://host", "etcd://h:1?lease_ttl_s=0.5", "etcd://h:1?ttl=3", "http://h:1"):
        assert url_problem(bad), bad
    with pytest.raises(ConfigError, match="registry.*is not host:port"):
        GatewayConfig(registry="etcd://host").validate()


async def test_register_heartbeat_and_deregister(etcd):
    client = registration_for(etcd.url, timeout=2.0)
    load = Load(running=0)
    try:
        registered = await client.start_heartbeats(make_instance("p0"), lambda: load)
        assert (registered.lease_ttl_s, client.heartbeat_interval_s) == (1.0, 1 / 3)
        await client.register(make_instance("b0", "both", 9100))
        assert [i.id for i in await client.list("both")] == ["b0"]
        load = Load(running=5, kv_blocks_total=64)
        # b0 has no heartbeats: its lease runs out; p0's heartbeats keep it, with its new load
        await eventually(lambda: _ids(client, ["p0"]), timeout=5.0)
        [p0] = await client.list()
        await eventually(lambda: _load(client, load), timeout=3.0)
        await client.stop()  # revokes the lease: gone at once
        assert await client.list() == []
    finally:
        await client.close()


async def _ids(client, ids: list[str]) -> bool:
    return sorted(i.id for i in await client.list()) == ids


async def _load(client, load: Load) -> bool:
    return [i.load for i in await client.list()] == [load]


async def test_same_id_or_endpoint_replaces_and_incompatible_is_refused(etcd):
    client = registration_for(etcd.url, timeout=2.0)
    watcher = watcher_for(etcd.url, idle_timeout=2.0, grace_s=0.0)
    seen = log_of(watcher)
    try:
        watcher.start()
        await watcher.wait_ready(timeout=5.0)
        await client.register(make_instance("p0", "prefill", 9000))
        await client.register(msgspec.structs.replace(make_instance("p0", "prefill", 9000), load=Load(waiting=2)))
        await client.register(make_instance("p1", "prefill", 9000))  # p0's endpoint, a new id: p0 is replaced
        assert [i.id for i in await client.list()] == ["p1"]
        with pytest.raises(PeerError) as err:
            await client.register(make_instance("d0", "decode", 9200, head_dim=16))
        assert err.value.code == "incompatible" and "head_dim" in err.value.message
        with pytest.raises(PeerError) as err:
            await client.register(make_instance("", "decode", 9200))
        assert err.value.code == "invalid_request"
        await client.register(make_instance("d0", "decode", 9200))
        await eventually(lambda: sorted(watcher.instances) == ["d0", "p1"])
        assert seen == [("joined", "p0"), ("updated", "p0"), ("left", "p0"), ("joined", "p1"), ("joined", "d0")]
    finally:
        await watcher.close()
        await client.close()


async def test_concurrent_registrations_are_checked_atomically(etcd):
    """Two registrations that exclude each other, racing: the transaction lets exactly one in."""
    clients = [registration_for(etcd.url, timeout=2.0) for _ in range(2)]
    try:
        for round in range(3):
            rivals = [make_instance(f"p{round}", "prefill", 9000), make_instance(f"d{round}", "decode", 9100, head_dim=16)]
            results = await asyncio.gather(*(c.register(i) for c, i in zip(clients, rivals)), return_exceptions=True)
            assert [r.code for r in results if isinstance(r, PeerError)] == ["incompatible"], results
            for instance in await clients[0].list():  # whichever won: the next pair must not depend on it
                await clients[0].deregister(instance.id)
            same_endpoint = [make_instance(f"a{round}", "prefill", 9200), make_instance(f"b{round}", "prefill", 9200)]
            await asyncio.gather(*(c.register(i) for c, i in zip(clients, same_endpoint)))
            listed = await clients[0].list()
            assert len(listed) == 1 and listed[0].request_endpoint.endswith(":9200"), listed
            await clients[0].deregister(listed[0].id)
    finally:
        for c in clients:
            await c.close()


async def test_a_sigkilled_engine_expires(etcd):
    watcher = watcher_for(etcd.url, idle_timeout=2.0, grace_s=0.0)
    watcher.start()
    proc = subprocess.Popen([sys.executable, "-m", "bench.fakes", "--registry", etcd.url, "--decode", "0"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await eventually(lambda: len(watcher.instances) == 1, timeout=20.0)
        await asyncio.sleep(2.0)  # two lease TTLs: alive thanks to its heartbeats
        assert len(watcher.instances) == 1
        proc.send_signal(signal.SIGKILL)
        await eventually(lambda: not watcher.instances, timeout=4.0)  # the 1 s lease ran out
    finally:
        proc.kill()
        proc.wait()
        await watcher.close()


async def test_the_gateway_follows_membership(etcd):
    async with FakeCluster(discovery=etcd.url, gateway={"registry_idle_timeout_s": 2.0}) as cluster:
        client = openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="none", max_retries=0)
        reply = await client.completions.create(model="fake", prompt="hello", max_tokens=3)
        assert reply.choices[0].finish_reason == "length"
        [decode] = cluster.of("decode")
        await decode.stop()
        with pytest.raises(openai.APIStatusError) as err:
            await client.completions.create(model="fake", prompt="hello", max_tokens=3)
        assert err.value.status_code == 503
        await cluster.add_engine("decode")
        await eventually(lambda: _completes(client), timeout=5.0)
        await client.close()


async def _completes(client: openai.AsyncOpenAI) -> bool:
    try:
        await client.completions.create(model="fake", prompt="hello", max_tokens=3)
        return True
    except openai.APIStatusError:
        return False


async def test_the_watch_resumes_from_its_revision_on_another_member():
    """Changes made while the watcher's member is down -- even one that came and went -- arrive once each."""
    async with EtcdCluster(3, lease_ttl_s=60) as etcd:  # nothing heartbeats here: no lease may run out
        client = registration_for(etcd.member_url("m1", "m2"), timeout=2.0)
        # talks to m0 first; reconnects 1 s after losing it, when every change below is made
        watcher = EtcdWatcher(etcd.url, idle_timeout=2.0, backoff_initial_s=1.0)
        seen = log_of(watcher)
        try:
            await client.register(make_instance("a", "prefill", 9000))
            watcher.start()
            await eventually(lambda: "a" in watcher.instances)
            etcd.kill("m0")
            await client.register(make_instance("b", "prefill", 9100))
            await client.register(make_instance("c", "prefill", 9200))
            await client.deregister("c")
            await client.deregister("a")
            await eventually(lambda: list(watcher.instances) == ["b"], timeout=5.0)
            assert seen == [("joined", "a"), ("joined", "b"), ("joined", "c"), ("left", "c"), ("left", "a")]
        finally:
            await watcher.close()
            await client.close()


async def test_losing_an_etcd_member_mid_load_fails_no_request():
    async with EtcdCluster(3, lease_ttl_s=2) as etcd, FakeCluster(discovery=etcd.url, prefill=2, decode=2,
                                                   gateway={"registry_idle_timeout_s": 2.0}) as cluster:
        client = openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="none", max_retries=0)
        ids = sorted(e.id for e in cluster.engines)
        results: list[object] = []

        async def load(n: int) -> None:
            for _ in range(n):
                try:
                    results.append(await client.completions.create(model="fake", prompt="hi", max_tokens=4))
                except openai.OpenAIError as e:
                    results.append(e)

        workers = [asyncio.create_task(load(40)) for _ in range(4)]
        await eventually(lambda: len(results) >= 20, timeout=10.0)
        etcd.kill("m0")  # every client talks to m0 first: all of them fail over
        await asyncio.gather(*workers)
        failed = [r for r in results if isinstance(r, Exception)]
        assert not failed and len(results) == 160
        await asyncio.sleep(2.5)  # past a lease TTL after the kill: the heartbeats kept every lease on m1/m2
        check = registration_for(etcd.member_url("m1", "m2"), timeout=2.0)
        try:
            assert sorted(i.id for i in await check.list()) == ids
        finally:
            await check.close()
        assert (await client.models.list()).data[0].id == "fake"
        await client.close()


async def test_up_with_the_etcd_backend_runs_a_local_etcd_for_its_stack():
    stack = Stack(UpConfig(registry_backend="etcd"))
    assert stack.registry == f"etcd://127.0.0.1:{stack.registry_port}"
    assert ["--registry", stack.registry] == stack.engine_argv("prefill")[1:3]
    assert stack.gateway.registry == stack.registry
    try:
        stack.start_etcd()
        client = registration_for(stack.registry, timeout=2.0)
        try:
            await client.register(make_instance("p0"))
            assert [i.id for i in await client.list()] == ["p0"]
        finally:
            await client.close()
    finally:
        stack.stop()
    assert not os.path.exists(stack.etcd_dir)
