"""Register ownership (issue 15): an instance id belongs to the key that first registered it.

The membership table is pure state: each call says which key sent it (``owner``, None when
unauthenticated).  The registry service's side (only engine keys may register, the owner taken
from the CURVE handshake) is tried over real sockets in ``test_bus_auth.py``.
"""

from __future__ import annotations

import msgspec
import pytest

from common.errors import PeerError
from common.messages import PROTOCOL_VERSION, Load
from services.registry.membership import Membership
from tests.test_registry import changes, make_instance

OWNER, OTHER = "engine-key-a", "engine-key-b"


def registered(*instances, owner: str | None = OWNER) -> Membership:
    m = Membership(lease_ttl_s=3.0)
    for instance in instances:
        m.register(instance, PROTOCOL_VERSION, 0.0, owner)
    return m


def refused(call) -> PeerError:
    with pytest.raises(PeerError) as e:
        call()
    assert e.value.code == "forbidden"
    return e.value


def test_same_key_replaces_its_record_on_restart():
    live = make_instance("p0", port=9000)
    m = registered(live)
    restarted = make_instance("p0", port=9100)
    assert changes(m.register(restarted, PROTOCOL_VERSION, 1.0, OWNER)) == [("updated", "p0")]
    assert m.instances == {"p0": restarted}


def test_another_key_cannot_take_a_live_id():
    live = make_instance("p0", port=9000)
    m = registered(live)
    refused(lambda: m.register(make_instance("p0", port=9100), PROTOCOL_VERSION, 1.0, OTHER))
    assert m.instances == {"p0": live} and m.last_seen == {"p0": 0.0}


def test_another_key_cannot_evict_an_instance_by_its_endpoint():
    """Today a new id at a live endpoint evicts the real instance: a flap anyone can repeat."""
    live = make_instance("p0", port=9000)
    m = registered(live)
    refused(lambda: m.register(make_instance("attacker", port=9000), PROTOCOL_VERSION, 1.0, OTHER))
    assert m.instances == {"p0": live}
    # the owner itself may move its endpoint to a new id (a restart under a new id)
    assert changes(m.register(make_instance("p1", port=9000), PROTOCOL_VERSION, 1.0, OWNER)) == [
        ("left", "p0"), ("joined", "p1")]


def test_heartbeats_and_deregistration_only_from_the_owner():
    m = registered(make_instance("p0"))
    refused(lambda: m.heartbeat("p0", Load(running=3), 2.0, OTHER))
    refused(lambda: m.deregister("p0", OTHER))
    assert m.last_seen == {"p0": 0.0} and m.instances["p0"].load == Load()
    assert changes(m.heartbeat("p0", Load(running=3), 2.0, OWNER)) == [("updated", "p0")]
    assert changes(m.deregister("p0", OWNER)) == [("left", "p0")]


def test_an_expired_id_is_free_for_another_key():
    m = registered(make_instance("p0"))
    m.expire(10.0)
    other = make_instance("p0", port=9200)
    assert changes(m.register(other, PROTOCOL_VERSION, 11.0, OTHER)) == [("joined", "p0")]
    refused(lambda: m.heartbeat("p0", Load(), 12.0, OWNER))


def test_unauthenticated_records_are_anyones():
    """Without CURVE there is no key to bind to: any caller may act, as before."""
    m = registered(make_instance("p0"), owner=None)
    replaced = msgspec.structs.replace(make_instance("p0"), kv_endpoint="tcp://127.0.0.1:9999")
    assert changes(m.register(replaced, PROTOCOL_VERSION, 1.0, None)) == [("updated", "p0")]
    assert changes(m.deregister("p0", None)) == [("left", "p0")]
