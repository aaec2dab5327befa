"""Registry messages: instances register, heartbeat, leave; gateways list and watch them."""

from __future__ import annotations

from typing import Literal

from common.messages.base import Instance, Load, Message, PROTOCOL_VERSION, Role


class Register(Message):
    instance: Instance
    protocol_version: int = PROTOCOL_VERSION


class Registered(Message):
    lease_ttl_s: float
    heartbeat_interval_s: float


class Heartbeat(Message):
    instance_id: str
    load: Load


class Deregister(Message):
    instance_id: str


class ListInstances(Message):
    role: Role | None = None


class InstanceList(Message):
    instances: list[Instance]


class Watch(Message):
    """Stream: one ``InstanceList`` snapshot, then a ``MembershipEvent`` per change."""


MembershipChange = Literal["joined", "updated", "left", "expired"]


class MembershipEvent(Message):
    change: MembershipChange
    instance: Instance
