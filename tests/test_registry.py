"""Registry: the membership table (pure) and the service over real ZMQ sockets."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest

from bench.processes import free_port
from common.bus import BusClient
from common.config import ConfigError
from common.engine.kv_cache import KVCache
from common.errors import CallTimeout, PeerError, PeerGone
from common.messages import (
    PROTOCOL_VERSION,
    Ack,
    Capacity,
    Deregister,
    Fingerprint,
    Heartbeat,
    Instance,
    InstanceList,
    ListInstances,
    Load,
    MembershipEvent,
    Register,
    Registered,
    Watch,
)
from services.registry.membership import Membership
from services.registry.server import Registry, RegistryConfig

REPO = Path(__file__).resolve().parents[1]


def make_instance(id: str = "p0", role: str = "prefill", port: int = 9000, **fingerprint) -> Instance:
    fp = dict(
        model="demo",
        dtype="float32",
        block_size=16,
        num_layers=2,
        num_kv_heads=2,
        head_dim=8,
        kv_layout=KVCache.LAYOUT,
        transfer_backend="mooncake",
    )
    fp.update(fingerprint)
    return Instance(
        id=id,
        role=role,
        request_endpoint=f"tcp://127.0.0.1:{port}",
        kv_endpoint=f"tcp://127.0.0.1:{port + 1}",
        model="demo",
        fingerprint=Fingerprint(**fp),
        capacity=Capacity(max_num_seqs=8, num_kv_blocks=64, max_model_len=256),
    )


def changes(events: list[MembershipEvent]) -> list[tuple[str, str]]:
    return [(e.change, e.instance.id) for e in events]


# --------------------------------------------------------------------------- #
# Membership table
# --------------------------------------------------------------------------- #


def test_whole_dict_dedup_scenario_replaces_instead_of_appending():
    """ATOM's `_append_whole_dict_unique` added a restarted instance with a changed field twice."""
    m = Membership(lease_ttl_s=3.0)
    first = make_instance("p0")
    assert changes(m.register(first, PROTOCOL_VERSION, 0.0)) == [("joined", "p0")]
    # The very same record again: still one entry.
    assert changes(m.register(first, PROTOCOL_VERSION, 0.1)) == [("updated", "p0")]
    # Restarted with a changed field (more KV blocks): replaced, not added.
    restarted = msgspec.structs.replace(first, capacity=Capacity(max_num_seqs=8, num_kv_blocks=128, max_model_len=256))
    assert changes(m.register(restarted, PROTOCOL_VERSION, 0.2)) == [("updated", "p0")]
    assert m.list() == [restarted]


def test_same_endpoint_new_id_removes_the_old_record():
    m = Membership(lease_ttl_s=3.0)
    m.register(make_instance("old", port=9000), PROTOCOL_VERSION, 0.0)
    m.register(make_instance("other", port=9100), PROTOCOL_VERSION, 0.0)
    events = m.register(make_instance("new", port=9000), PROTOCOL_VERSION, 1.0)
    assert changes(events) == [("left", "old"), ("joined", "new")]
    assert sorted(m.instances) == ["new", "other"]


def test_same_id_new_endpoint_replaces_and_frees_the_old_endpoint():
    m = Membership(lease_ttl_s=3.0)
    m.register(make_instance("p0", port=9000), PROTOCOL_VERSION, 0.0)
    assert changes(m.register(make_instance("p0", port=9200), PROTOCOL_VERSION, 0.1)) == [("updated", "p0")]
    assert [i.request_endpoint for i in m.list()] == ["tcp://127.0.0.1:9200"]
    # The old endpoint is free: another id there replaces nothing.
    assert changes(m.register(make_instance("p1", port=9000), PROTOCOL_VERSION, 0.2)) == [("joined", "p1")]


def test_incompatible_fingerprint_is_refused_naming_fields_and_peer():
    m = Membership(lease_ttl_s=3.0)
    m.register(make_instance("p0", "prefill", 9000), PROTOCOL_VERSION, 0.0)
    with pytest.raises(PeerError) as err:
        m.register(make_instance("d0", "decode", 9100, block_size=24, dtype="bfloat16"), PROTOCOL_VERSION, 0.0)
    assert err.value.code == "incompatible"
    assert "block_size: prefill 16 and decode 24 differ and are not both powers of two" in err.value.message
    assert "dtype: prefill 'float32', decode 'bfloat16'" in err.value.message
    assert "'p0'" in err.value.message
    assert "num_layers" not in err.value.message
    assert list(m.instances) == ["p0"]


def test_block_sizes_may_differ_as_powers_of_two_but_head_dim_may_not():
    m = Membership(lease_ttl_s=3.0)
    m.register(make_instance("p16", "prefill", 9000), PROTOCOL_VERSION, 0.0)
    m.register(make_instance("d32", "decode", 9100, block_size=32), PROTOCOL_VERSION, 0.0)
    m.register(make_instance("p64", "prefill", 9200, block_size=64), PROTOCOL_VERSION, 0.0)
    assert sorted(m.instances) == ["d32", "p16", "p64"]
    with pytest.raises(PeerError) as err:
        m.register(make_instance("d-hd", "decode", 9300, block_size=32, head_dim=16), PROTOCOL_VERSION, 0.0)
    assert err.value.code == "incompatible" and err.value.param == "instance.fingerprint"
    assert "head_dim: prefill 8, decode 16" in err.value.message
    assert "block_size" not in err.value.message
    assert "d-hd" not in m.instances


def test_tp_sizes_may_differ_when_one_divides_the_other():
    m = Membership(lease_ttl_s=3.0)
    m.register(make_instance("p1", "prefill", 9000), PROTOCOL_VERSION, 0.0)
    m.register(make_instance("d2", "decode", 9100, tensor_parallel_size=2), PROTOCOL_VERSION, 0.0)
    m.register(make_instance("p4", "prefill", 9200, tensor_parallel_size=4), PROTOCOL_VERSION, 0.0)
    assert sorted(m.instances) == ["d2", "p1", "p4"]
    with pytest.raises(PeerError) as err:
        m.register(make_instance("d3", "decode", 9400, tensor_parallel_size=3), PROTOCOL_VERSION, 0.0)
    assert err.value.code == "incompatible" and err.value.param == "instance.fingerprint"
    assert "prefill TP 4 and decode TP 3: neither divides the other" in err.value.message
    assert "prefill TP 1" not in err.value.message  # TP 1 divides 3: that pair could work
    assert "d3" not in m.instances


def test_transfer_backend_may_differ_only_for_both_role():
    m = Membership(lease_ttl_s=3.0)
    m.register(make_instance("p0", "prefill", 9000), PROTOCOL_VERSION, 0.0)
    m.register(make_instance("b0", "both", 9100, transfer_backend="mori"), PROTOCOL_VERSION, 0.0)
    with pytest.raises(PeerError) as err:
        m.register(make_instance("d0", "decode", 9200, transfer_backend="mori"), PROTOCOL_VERSION, 0.0)
    assert err.value.code == "incompatible" and "transfer_backend" in err.value.message


def test_mixing_kv_modes_for_one_model_is_refused_but_a_colocated_instance_may_differ():
    m = Membership(lease_ttl_s=3.0)
    push = lambda name, role, port: msgspec.structs.replace(make_instance(name, role, port), kv_mode="push")
    m.register(push("p0", "prefill", 9000), PROTOCOL_VERSION, 0.0)
    m.register(push("d0", "decode", 9100), PROTOCOL_VERSION, 0.0)
    m.register(make_instance("b0", "both", 9200), PROTOCOL_VERSION, 0.0)  # read mode: it moves no KV
    for name, role, port in (("d1", "decode", 9300), ("p1", "prefill", 9400)):
        with pytest.raises(PeerError) as err:
            m.register(make_instance(name, role, port), PROTOCOL_VERSION, 0.0)
        assert err.value.code == "incompatible" and err.value.param == "instance.fingerprint"
        assert f"{name} moves KV in read mode" in err.value.message and "push mode" in err.value.message
    assert sorted(m.instances) == ["b0", "d0", "p0"]


def test_reregistering_the_only_instance_may_change_its_fingerprint():
    m = Membership(lease_ttl_s=3.0)
    m.register(make_instance("p0"), PROTOCOL_VERSION, 0.0)
    m.register(make_instance("p0", block_size=32), PROTOCOL_VERSION, 0.1)
    assert m.instances["p0"].fingerprint.block_size == 32


def test_other_models_do_not_conflict():
    m = Membership(lease_ttl_s=3.0)
    m.register(make_instance("p0"), PROTOCOL_VERSION, 0.0)
    other = msgspec.structs.replace(make_instance("q0", port=9100, block_size=32), model="other")
    m.register(other, PROTOCOL_VERSION, 0.0)
    assert len(m.list()) == 2


def test_protocol_version_mismatch_names_both_versions():
    m = Membership(lease_ttl_s=3.0)
    with pytest.raises(PeerError) as err:
        m.register(make_instance(), PROTOCOL_VERSION + 41, 0.0)
    assert err.value.code == "protocol_version"
    assert str(PROTOCOL_VERSION + 41) in err.value.message and str(PROTOCOL_VERSION) in err.value.message


@pytest.mark.parametrize("field,value", [("id", ""), ("request_endpoint", " "), ("request_endpoint", "localhost:1")])
def test_unusable_instance_is_invalid_request(field, value):
    m = Membership(lease_ttl_s=3.0)
    with pytest.raises(PeerError) as err:
        m.register(msgspec.structs.replace(make_instance(), **{field: value}), PROTOCOL_VERSION, 0.0)
    assert err.value.code == "invalid_request" and err.value.param == f"instance.{field}"


def test_leases_expire_and_heartbeats_extend_them():
    m = Membership(lease_ttl_s=1.0)
    m.register(make_instance("p0", port=9000), PROTOCOL_VERSION, 0.0)
    m.register(make_instance("d0", "decode", 9100), PROTOCOL_VERSION, 0.0)
    assert m.next_deadline() == 1.0
    assert m.heartbeat("p0", Load(), 0.8) == []  # unchanged load: no event
    assert changes(m.expire(0.99)) == []
    assert changes(m.expire(1.0)) == [("expired", "d0")]
    assert m.next_deadline() == 1.8
    assert changes(m.expire(1.8)) == [("expired", "p0")]
    assert m.next_deadline() is None
    with pytest.raises(PeerError) as err:
        m.heartbeat("p0", Load(), 2.0)
    assert err.value.code == "unknown_instance"


def test_heartbeat_with_new_load_is_an_update():
    m = Membership(lease_ttl_s=1.0)
    m.register(make_instance("p0"), PROTOCOL_VERSION, 0.0)
    events = m.heartbeat("p0", Load(running=3, waiting=1), 0.5)
    assert changes(events) == [("updated", "p0")] and events[0].instance.load.running == 3
    assert m.instances["p0"].load == Load(running=3, waiting=1)


def test_deregister_is_immediate_and_idempotent():
    m = Membership(lease_ttl_s=1.0)
    m.register(make_instance("p0"), PROTOCOL_VERSION, 0.0)
    assert changes(m.deregister("p0")) == [("left", "p0")]
    assert m.deregister("p0") == [] and m.list() == []


def test_list_by_role_is_the_exact_role():
    """``common.roles.serves``: a ``both`` instance serves colocated requests only, not P/D legs."""
    m = Membership(lease_ttl_s=1.0)
    m.register(make_instance("p0", "prefill", 9000), PROTOCOL_VERSION, 0.0)
    m.register(make_instance("d0", "decode", 9100), PROTOCOL_VERSION, 0.0)
    m.register(make_instance("b0", "both", 9200), PROTOCOL_VERSION, 0.0)
    assert [i.id for i in m.list("prefill")] == ["p0"]
    assert [i.id for i in m.list("decode")] == ["d0"]
    assert [i.id for i in m.list("both")] == ["b0"]
    assert len(m.list()) == 3


# --------------------------------------------------------------------------- #
# Config
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        (dict(bind="127.0.0.1:7100"), "--bind"),
        (dict(heartbeat_interval_s=0.0), "--heartbeat-interval-s"),
        (dict(heartbeat_interval_s=1.0, lease_ttl_s=1.0), "--lease-ttl-s"),
        (dict(watch_queue_size=0), "--watch-queue-size"),
    ],
)
def test_config_validation_names_the_flag(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        RegistryConfig(**kwargs).validate()


def test_default_config_is_valid():
    config = RegistryConfig()
    config.validate()
    assert config.lease_ttl_s == 3 * config.heartbeat_interval_s


# --------------------------------------------------------------------------- #
# The service over ZMQ
# --------------------------------------------------------------------------- #


@asynccontextmanager
async def running_registry(**overrides):
    config = RegistryConfig(bind="tcp://127.0.0.1:0", **overrides)
    registry = Registry(config)
    await registry.start()
    client = BusClient(registry.endpoint, name="test", timeout=2.0)
    try:
        yield registry, client
    finally:
        await client.close()
        await registry.close()


async def next_event(stream, timeout: float = 2.0):
    """Next MembershipEvent of a watch stream, skipping idle snapshots."""
    async with asyncio.timeout(timeout):
        while True:
            reply = await anext(stream)
            if isinstance(reply, MembershipEvent):
                return reply


async def test_register_list_by_role_and_deregister():
    async with running_registry() as (_, client):
        reply = await client.call(Register(instance=make_instance("p0", "prefill", 9000)))
        assert reply == Registered(lease_ttl_s=3.0, heartbeat_interval_s=1.0)
        await client.call(Register(instance=make_instance("d0", "decode", 9100)))
        assert [i.id for i in (await client.call(ListInstances(role="decode"))).instances] == ["d0"]
        assert len((await client.call(ListInstances())).instances) == 2
        assert await client.call(Deregister(instance_id="d0")) == Ack()
        assert [i.id for i in (await client.call(ListInstances())).instances] == ["p0"]


async def test_list_instances_by_role_over_the_wire_leaves_out_both_instances():
    """The documented role rule, registry side: ``ListInstances(role="prefill")`` does not list ``both``."""
    async with running_registry() as (_, client):
        await client.call(Register(instance=make_instance("p0", "prefill", 9000)))
        await client.call(Register(instance=make_instance("b0", "both", 9200)))
        for role, expected in (("prefill", ["p0"]), ("decode", []), ("both", ["b0"]), (None, ["b0", "p0"])):
            listed = (await client.call(ListInstances(role=role))).instances
            assert sorted(i.id for i in listed) == expected, role


async def test_refusals_travel_as_typed_errors():
    async with running_registry() as (_, client):
        await client.call(Register(instance=make_instance("p0")))
        with pytest.raises(PeerError) as err:
            await client.call(Register(instance=make_instance("d0", "decode", 9100, num_kv_heads=4)))
        assert err.value.code == "incompatible" and "num_kv_heads" in err.value.message
        with pytest.raises(PeerError) as err:
            await client.call(Register(instance=make_instance("d1", "decode", 9200), protocol_version=99))
        assert err.value.code == "protocol_version" and "99" in err.value.message
        with pytest.raises(PeerError) as err:
            await client.call(Heartbeat(instance_id="ghost", load=Load()))
        assert err.value.code == "unknown_instance"


async def test_watch_sees_join_update_leave_and_expiry():
    async with running_registry(heartbeat_interval_s=0.1, lease_ttl_s=0.3) as (_, client):
        await client.call(Register(instance=make_instance("p0", port=9000)))
        stream = client.stream(Watch(), idle_timeout=2.0)
        snapshot = await anext(stream)
        assert isinstance(snapshot, InstanceList) and [i.id for i in snapshot.instances] == ["p0"]

        await client.call(Register(instance=make_instance("d0", "decode", 9100)))
        event = await next_event(stream)
        assert (event.change, event.instance.id) == ("joined", "d0")

        await client.call(Heartbeat(instance_id="d0", load=Load(running=2)))
        event = await next_event(stream)
        assert (event.change, event.instance.id, event.instance.load.running) == ("updated", "d0", 2)

        await client.call(Deregister(instance_id="d0"))
        event = await next_event(stream)
        assert (event.change, event.instance.id) == ("left", "d0")

        # p0 stopped heart-beating after its registration: it expires within the TTL (+ slack).
        started = time.monotonic()
        event = await next_event(stream)
        assert (event.change, event.instance.id) == ("expired", "p0")
        assert time.monotonic() - started < 0.6
        assert (await client.call(ListInstances())).instances == []
        await stream.aclose()


async def test_endpoint_takeover_is_seen_as_left_then_joined():
    async with running_registry() as (_, client):
        await client.call(Register(instance=make_instance("old", port=9000)))
        stream = client.stream(Watch(), idle_timeout=2.0)
        await anext(stream)
        await client.call(Register(instance=make_instance("new", port=9000)))
        first, second = await next_event(stream), await next_event(stream)
        assert [(first.change, first.instance.id), (second.change, second.instance.id)] == [
            ("left", "old"),
            ("joined", "new"),
        ]
        await stream.aclose()


async def test_idle_watch_repeats_the_snapshot():
    async with running_registry(heartbeat_interval_s=0.05, lease_ttl_s=5.0) as (_, client):
        await client.call(Register(instance=make_instance("p0")))
        stream = client.stream(Watch(), idle_timeout=1.0)
        first, second = await anext(stream), await anext(stream)
        assert isinstance(second, InstanceList) and second == first
        await stream.aclose()


async def test_slow_watcher_is_cut_off_with_overloaded():
    async with running_registry(watch_queue_size=1) as (registry, client):
        await client.call(Register(instance=make_instance("old", port=9000)))
        stream = client.stream(Watch(), idle_timeout=2.0)
        await anext(stream)
        assert len(registry.watchers) == 1
        # An endpoint takeover publishes two events at once: more than this watcher's queue holds.
        await client.call(Register(instance=make_instance("new", port=9000)))
        with pytest.raises(PeerError) as err:
            await next_event(stream)
        assert err.value.code == "overloaded"
        assert not registry.watchers


async def test_subprocess_serves_and_exits_on_sigterm():
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.registry", "--bind", endpoint, "--log-level", "warning"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stderr=subprocess.PIPE,
    )
    client = BusClient(endpoint, name="test", timeout=1.0)
    try:
        deadline = time.monotonic() + 20
        while True:  # the process needs a moment to import and bind
            try:
                await client.call(Register(instance=make_instance("p0")))
                break
            except (CallTimeout, PeerGone):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
        listed = await client.call(ListInstances(role="prefill"))
        assert [i.id for i in listed.instances] == ["p0"]
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(proc.communicate, timeout=5)
        assert proc.returncode == 0, stderr.decode()
    finally:
        await client.close()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
