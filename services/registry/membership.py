"""The registry's membership table: pure logic, no sockets, no clock of its own.

Every mutating method takes ``now`` (a monotonic time in seconds) and returns
the ``MembershipEvent``s it caused, in order, for the server to fan out to
watchers.  Refusals raise ``PeerError`` with the code the wire reply carries.

Rules:
* An instance is identified by its id *and* by its request endpoint: a
  registration whose id or endpoint matches an existing record replaces it
  (never a second entry).  Same id -> one "updated" event; an endpoint taken
  over by a new id -> "left" for the old id, then "joined" for the new one.
* Each record is owned by the key that registered it (``owner``, the sender's
  CURVE public key; None when unauthenticated, which anyone may act for): a
  registration replaces a record only of its own key (the same instance,
  restarted), and heartbeats and deregistrations come from the owner only;
  anything else is refused with ``forbidden`` and changes nothing.
* Instances serving the same model must be able to read each other's KV
  (``common.kv_compat.kv_incompatibilities``: block sizes may differ, both powers
  of two), except that a ``both``-role instance may differ in ``transfer_backend``; and
  prefill and decode instances of one model all move KV in one ``kv_mode`` (read or push).
* A record whose last register/heartbeat is older than ``lease_ttl_s`` expires.
* A heartbeat emits "updated" only when the load changed (so a watcher sees
  every load change, at most one event per heartbeat per instance).
"""

from __future__ import annotations

import logging

import msgspec

from common.errors import PeerError
from common.kv_compat import kv_incompatibilities
from common.messages import PROTOCOL_VERSION, Instance, Load, MembershipEvent, Role
from common.roles import serves

logger = logging.getLogger(__name__)

# Fingerprint fields a `both`-role instance may have different from its peers.
BOTH_ROLE_MAY_DIFFER = frozenset({"transfer_backend", "tensor_parallel_size"})  # a both instance moves no KV
SAME_ROLE_MAY_DIFFER = frozenset({"tensor_parallel_size"})


def incompatibilities(a: Instance, b: Instance) -> dict[str, str]:
    """Why two instances of the same model cannot share KV (fingerprint field -> reason); empty if they can.

    The rule is "can a decode read that prefill", asked with the prefill-side instance first
    (so the reasons name the sides right); it is symmetric in what it accepts.
    """
    prefill, decode = (b, a) if a.role == "decode" else (a, b)
    reasons = kv_incompatibilities(prefill.fingerprint, decode.fingerprint)
    if "both" in (a.role, b.role):
        reasons = {f: why for f, why in reasons.items() if f not in BOTH_ROLE_MAY_DIFFER}
    if a.role == b.role:  # two prefills (or two decodes) never read each other's KV
        reasons = {f: why for f, why in reasons.items() if f not in SAME_ROLE_MAY_DIFFER}
    if "both" not in (a.role, b.role) and a.kv_mode != b.kv_mode:
        reasons["kv_mode"] = f"{a.id} moves KV in {a.kv_mode} mode, {b.id} in {b.kv_mode} mode (--kv-mode)"
    return reasons


def check_instance(instance: Instance) -> None:
    """Reject a record that no client could use (``invalid_request``)."""
    for name in ("id", "request_endpoint", "model"):
        if not getattr(instance, name).strip():
            raise PeerError("invalid_request", f"instance.{name} must not be empty", f"instance.{name}")
    if "://" not in instance.request_endpoint:
        raise PeerError(
            "invalid_request",
            f"instance.request_endpoint {instance.request_endpoint!r} is not a zmq endpoint (tcp://host:port)",
            "instance.request_endpoint",
        )


class Membership:
    """The set of live instances with their leases."""

    def __init__(self, lease_ttl_s: float):
        if lease_ttl_s <= 0:
            raise ValueError(f"lease_ttl_s must be > 0, got {lease_ttl_s}")
        self.lease_ttl_s = lease_ttl_s
        self.instances: dict[str, Instance] = {}
        self.last_seen: dict[str, float] = {}
        self.owners: dict[str, str | None] = {}

    @classmethod
    def holding(cls, instances: list[Instance], lease_ttl_s: float) -> Membership:
        """A membership of ``instances`` as another store keeps them (etcd): seen at time 0, bound to no key."""
        membership = cls(lease_ttl_s)
        for instance in instances:
            membership.instances[instance.id] = instance
            membership.last_seen[instance.id] = 0.0
            membership.owners[instance.id] = None
        return membership

    def list(self, role: Role | None = None) -> list[Instance]:
        """The live instances that serve ``role`` (``common.roles.serves``: the exact role; None: all)."""
        return [i for i in self.instances.values() if serves(i, role)]

    def next_deadline(self) -> float | None:
        """Monotonic time at which the oldest lease runs out (None when empty)."""
        return min(self.last_seen.values()) + self.lease_ttl_s if self.last_seen else None

    def check_owner(self, instance_id: str, owner: str | None, action: str) -> None:
        """Raise ``forbidden`` unless ``owner`` may ``action`` the record of ``instance_id``."""
        held = self.owners.get(instance_id)
        if held is not None and held != owner:
            raise PeerError("forbidden", f"instance {instance_id!r} is registered by another key; "
                            f"this key may not {action} it", "instance_id")

    def register(self, instance: Instance, protocol_version: int, now: float,
                 owner: str | None = None) -> list[MembershipEvent]:
        if protocol_version != PROTOCOL_VERSION:
            raise PeerError(
                "protocol_version",
                f"client speaks protocol version {protocol_version}, this registry speaks {PROTOCOL_VERSION}",
                "protocol_version",
            )
        check_instance(instance)
        replaced = [
            old
            for old in self.instances.values()
            if old.id == instance.id or old.request_endpoint == instance.request_endpoint
        ]
        for old in replaced:
            self.check_owner(old.id, owner, "replace")
        replaced_ids = {old.id for old in replaced}
        for other in self.instances.values():
            if other.id in replaced_ids or other.model != instance.model:
                continue
            reasons = incompatibilities(instance, other)
            if reasons:
                raise PeerError(
                    "incompatible",
                    f"instance {instance.id!r} ({instance.role}) cannot share KV with registered instance "
                    f"{other.id!r} ({other.role}) of model {instance.model!r}: " + "; ".join(reasons.values()),
                    "instance.fingerprint",
                )
        events: list[MembershipEvent] = []
        for old in replaced:
            if old.id != instance.id:
                logger.info("instance %s replaces %s at %s", instance.id, old.id, old.request_endpoint)
                events.append(self._remove(old.id, "left"))
        change = "updated" if instance.id in self.instances else "joined"
        self.instances[instance.id] = instance
        self.last_seen[instance.id] = now
        self.owners[instance.id] = owner
        logger.info("instance %s %s (%s, %s)", instance.id, change, instance.role, instance.request_endpoint)
        events.append(MembershipEvent(change=change, instance=instance))
        return events

    def heartbeat(self, instance_id: str, load: Load, now: float, owner: str | None = None) -> list[MembershipEvent]:
        instance = self.instances.get(instance_id)
        if instance is None:
            raise PeerError("unknown_instance", f"instance {instance_id!r} is not registered; register again", "instance_id")
        self.check_owner(instance_id, owner, "heartbeat for")
        self.last_seen[instance_id] = now
        if load == instance.load:
            return []
        instance = self.instances[instance_id] = msgspec.structs.replace(instance, load=load)
        return [MembershipEvent(change="updated", instance=instance)]

    def deregister(self, instance_id: str, owner: str | None = None) -> list[MembershipEvent]:
        """Remove at once; deregistering an unknown id is a no-op (idempotent)."""
        if instance_id not in self.instances:
            return []
        self.check_owner(instance_id, owner, "deregister")
        logger.info("instance %s left", instance_id)
        return [self._remove(instance_id, "left")]

    def expire(self, now: float) -> list[MembershipEvent]:
        """Remove every instance whose lease ran out by ``now``."""
        dead = [i for i, seen in self.last_seen.items() if now - seen >= self.lease_ttl_s]
        for instance_id in dead:
            logger.warning("instance %s expired (no heartbeat for %.1fs)", instance_id, now - self.last_seen[instance_id])
        return [self._remove(i, "expired") for i in dead]

    def _remove(self, instance_id: str, change: str) -> MembershipEvent:
        instance = self.instances.pop(instance_id)
        del self.last_seen[instance_id]
        del self.owners[instance_id]
        return MembershipEvent(change=change, instance=instance)
