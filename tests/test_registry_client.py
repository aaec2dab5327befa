"""RegistryClient and MembershipWatcher against a real registry on loopback."""

from __future__ import annotations

import asyncio
import time
import socket

import msgspec
import pytest

from bench.processes import free_port
from common.errors import PeerError
from common.messages import Load
from common.registry_client import MembershipWatcher, RegistryClient
from services.registry.server import Registry, RegistryConfig
from test_registry import make_instance
from tests.procs import eventually

FAST = dict(heartbeat_interval_s=0.05, lease_ttl_s=0.3)


async def start_registry(bind: str = "tcp://127.0.0.1:0", **overrides) -> Registry:
    registry = Registry(RegistryConfig(bind=bind, **{**FAST, **overrides}))
    await registry.start()
    return registry


async def wait_port_free(port: int) -> None:
    """libzmq releases a closed listener asynchronously (a restarted process does not see this)."""
    async with asyncio.timeout(3.0):
        while True:
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(("127.0.0.1", port))
                    return
                except OSError:
                    pass
            await asyncio.sleep(0.02)


@pytest.fixture
async def registry():
    registry = await start_registry()
    yield registry
    await registry.close()


async def test_register_list_deregister(registry):
    client = RegistryClient(registry.endpoint, timeout=2.0)
    try:
        registered = await client.register(make_instance("p0", "prefill", 9000))
        assert (registered.heartbeat_interval_s, registered.lease_ttl_s) == (0.05, 0.3)
        assert client.heartbeat_interval_s == 0.05
        await client.register(make_instance("b0", "both", 9100))
        assert await client.list("decode") == []  # a both instance serves colocated requests only
        assert [i.id for i in await client.list("both")] == ["b0"]
        assert sorted(i.id for i in await client.list()) == ["b0", "p0"]
        await client.deregister("b0")
        assert [i.id for i in await client.list()] == ["p0"]
        with pytest.raises(PeerError) as err:
            await client.register(make_instance("d0", "decode", 9200, head_dim=16))
        assert err.value.code == "incompatible" and "head_dim" in err.value.message
    finally:
        await client.close()


async def test_heartbeats_keep_the_lease_and_report_load(registry):
    load = Load(running=0)
    client = RegistryClient(registry.endpoint, timeout=2.0)
    try:
        await client.start_heartbeats(make_instance("p0"), lambda: load)
        load = Load(running=5, kv_blocks_total=64)
        await asyncio.sleep(2 * registry.config.lease_ttl_s)  # well past the TTL: alive thanks to heartbeats
        [listed] = await client.list()
        assert listed.id == "p0" and listed.load == load
        await client.stop()  # deregisters at once
        assert await client.list() == []
    finally:
        await client.close()


async def test_async_load_fn_is_awaited(registry):
    async def load_fn() -> Load:
        return Load(waiting=7)

    client = RegistryClient(registry.endpoint, timeout=2.0)
    try:
        await client.start_heartbeats(make_instance("p0"), load_fn)
        await eventually(lambda: registry.membership.instances["p0"].load.waiting == 7)
    finally:
        await client.close()


async def test_heartbeat_loop_survives_a_down_registry_and_registers_when_it_comes_up():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    client = RegistryClient(endpoint, timeout=0.2)
    client.heartbeat_interval_s = 0.05
    task = asyncio.create_task(client.heartbeat_loop(make_instance("p0"), lambda: Load()))
    try:
        await asyncio.sleep(0.5)  # several failed attempts (timeouts), the loop keeps going
        assert not task.done()
        registry = await start_registry(endpoint)
        try:
            await eventually(lambda: "p0" in registry.membership.instances)
        finally:
            await registry.close()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()


async def test_registry_restart_loses_nothing():
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    registry = await start_registry(endpoint)
    client = RegistryClient(endpoint, timeout=0.5)
    watcher = MembershipWatcher(endpoint, idle_timeout=0.5, backoff_initial_s=0.05, backoff_max_s=0.2)
    seen: list[tuple[str, str]] = []
    watcher.add_listener(lambda change, instance: seen.append((change, instance.id)))
    try:
        await client.start_heartbeats(make_instance("p0"), lambda: Load())
        watcher.start()
        await watcher.wait_ready(timeout=3.0)
        await eventually(lambda: "p0" in watcher.instances)

        await registry.close()
        await wait_port_free(port)
        registry = await start_registry(endpoint)  # a new, empty registry on the same endpoint
        # The heartbeat gets unknown_instance and re-registers; the watcher reconnects
        # and its cache is reconciled with the new registry's snapshot.
        await eventually(lambda: "p0" in registry.membership.instances)
        await eventually(lambda: [i.id for i in registry.membership.list()] == list(watcher.instances))
        assert seen[0] == ("joined", "p0")
        assert seen.count(("joined", "p0")) - seen.count(("left", "p0")) == 1  # consistent sequence
    finally:
        await watcher.close()
        await client.close()
        await registry.close()


async def test_watcher_cache_follows_changes_and_survives_a_bad_listener(registry):
    client = RegistryClient(registry.endpoint, timeout=2.0)
    watcher = MembershipWatcher(registry.endpoint, idle_timeout=1.0)
    seen: list[tuple[str, str]] = []

    def broken(change, instance):
        raise ValueError("listener bug")

    watcher.add_listener(broken)
    watcher.add_listener(lambda change, instance: seen.append((change, instance.id)))
    try:
        await client.register(make_instance("p0", "prefill", 9000))
        watcher.start()
        await watcher.wait_ready(timeout=3.0)
        assert list(watcher.instances) == ["p0"]

        await client.register(make_instance("d0", "decode", 9100))
        await client.register(make_instance("b0", "both", 9200))
        await eventually(lambda: len(watcher.instances) == 3)
        assert [i.id for i in watcher.by_role("decode")] == ["d0"]
        assert [i.id for i in watcher.by_role("prefill")] == ["p0"]
        assert [i.id for i in watcher.by_role("both")] == ["b0"]

        await client.deregister("d0")
        # Nothing heart-beats here: everything expires after the 0.3 s TTL.
        await eventually(lambda: not watcher.instances)
        assert seen[:3] == [("joined", "p0"), ("joined", "d0"), ("joined", "b0")]
        assert ("left", "d0") in seen and ("expired", "p0") in seen and ("expired", "b0") in seen
    finally:
        await watcher.close()
        await client.close()


async def test_wait_ready_times_out_without_a_registry():
    watcher = MembershipWatcher(f"tcp://127.0.0.1:{free_port()}", idle_timeout=0.2, backoff_initial_s=0.05)
    watcher.start()
    try:
        with pytest.raises(TimeoutError):
            await watcher.wait_ready(timeout=0.3)
    finally:
        await watcher.close()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        MembershipWatcher("tcp://127.0.0.1:1", idle_timeout=0)
    with pytest.raises(ValueError):
        MembershipWatcher("tcp://127.0.0.1:1", backoff_initial_s=1.0, backoff_max_s=0.5)


def test_watcher_tells_listeners_only_real_changes():
    """Snapshots and events may overlap (reconnects, idle snapshots): the cache delta is what counts."""
    watcher = MembershipWatcher("tcp://127.0.0.1:1", grace_s=0.0)
    seen: list[tuple[str, str, int]] = []
    watcher.add_listener(lambda change, instance: seen.append((change, instance.id, instance.load.running)))
    p0, d0 = make_instance("p0", "prefill", 9000), make_instance("d0", "decode", 9100)
    watcher._apply_snapshot([p0, d0])
    watcher._apply("joined", p0)  # already known and equal: nothing
    busy = msgspec.structs.replace(p0, load=Load(running=4))
    watcher._apply("joined", busy)  # known but different: an update
    watcher._apply_snapshot([busy])  # d0 gone while we were away
    watcher._apply("expired", d0)  # already gone: nothing
    assert seen == [("joined", "p0", 0), ("joined", "d0", 0), ("updated", "p0", 4), ("left", "d0", 0)]
    assert watcher.instances == {"p0": busy}


def test_instances_missing_from_a_snapshot_stay_for_the_grace_period():
    """A restarted registry's first snapshot lacks instances that have not re-registered yet."""
    watcher = MembershipWatcher("tcp://127.0.0.1:1", grace_s=0.3)
    seen: list[tuple[str, str]] = []
    watcher.add_listener(lambda change, instance: seen.append((change, instance.id)))
    p0, d0, p1 = (make_instance("p0", "prefill", 9000), make_instance("d0", "decode", 9100),
                  make_instance("p1", "prefill", 9200))
    watcher._apply_snapshot([p0, d0, p1])
    watcher._apply_snapshot([p0])  # the new registry has heard from p0 only
    assert set(watcher.instances) == {"p0", "d0", "p1"}  # still routable
    watcher._apply_snapshot([p0, d0])  # d0 re-registered; p1 did not
    time.sleep(0.35)
    watcher._apply_snapshot([p0, d0])
    assert set(watcher.instances) == {"p0", "d0"}
    assert seen[-1] == ("left", "p1")
