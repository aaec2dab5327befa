"""Discovery on our ZMQ registry: register + heartbeats (engines), watch + cache (gateway).

``RegistryClient`` is the ``Registration`` for ``tcp://`` / ``ipc://`` URLs: a
heartbeat answered with ``unknown_instance`` (the registry restarted, or our
lease expired) re-registers at once (``common.discovery.registration``).

``MembershipWatcher`` mirrors the registry's membership in ``instances`` from
the ``Watch`` stream.  When the stream breaks (peer gone, idle timeout, error)
it reconnects with exponential backoff; every snapshot the registry sends
replaces the cache, and the implied joined/updated/left changes go to the
listeners, so a registry restart is seen as a consistent sequence of changes.
"""

from __future__ import annotations

import asyncio
import logging
import time

from common.bus import BusClient
from common.discovery.cache import MembershipCache
from common.discovery.registration import Registration
from common.errors import BusError
from common.messages import (
    Ack,
    Deregister,
    Heartbeat,
    Instance,
    InstanceList,
    ListInstances,
    Load,
    MembershipChange,
    MembershipEvent,
    Register,
    Registered,
    Role,
    Watch,
)

logger = logging.getLogger(__name__)


def expect(reply: object, cls: type) -> None:
    if not isinstance(reply, cls):
        raise BusError(f"registry answered {type(reply).__name__}, expected {cls.__name__}")


class RegistryClient(Registration):
    """Register / deregister / list, and a heartbeat task for one instance, on the ZMQ registry.

    Create it inside a running event loop (it owns a ``BusClient``); ``close()`` it.
    """

    def __init__(self, endpoint: str, *, timeout: float = 5.0):
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        super().__init__()
        self.endpoint = endpoint
        self.timeout = timeout
        self.heartbeat_interval_s = 1.0  # replaced by the registry's value at registration
        self._bus = BusClient(endpoint, name="registry", timeout=timeout, server_role="registry")

    async def register(self, instance: Instance) -> Registered:
        reply = await self._bus.call(Register(instance=instance))
        expect(reply, Registered)
        self.heartbeat_interval_s = reply.heartbeat_interval_s
        return reply

    async def deregister(self, instance_id: str) -> None:
        expect(await self._bus.call(Deregister(instance_id=instance_id)), Ack)

    async def list(self, role: Role | None = None) -> list[Instance]:
        reply = await self._bus.call(ListInstances(role=role))
        expect(reply, InstanceList)
        return reply.instances

    async def _heartbeat(self, instance_id: str, load: Load) -> None:
        expect(await self._bus.call(Heartbeat(instance_id=instance_id, load=load)), Ack)

    async def close(self) -> None:
        await self.stop()
        await self._bus.close()


class MembershipWatcher(MembershipCache):
    """A local, self-healing copy of the ZMQ registry's membership."""

    def __init__(
        self,
        endpoint: str,
        *,
        idle_timeout: float = 5.0,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 2.0,
        grace_s: float = 5.0,
    ):
        """``idle_timeout`` must exceed the registry's heartbeat interval (its snapshot period).

        ``grace_s``: an instance missing from a snapshot (a restarted registry that has not
        heard from it again yet) stays in the cache this long before it counts as left;
        events from the registry ("left", "expired") still remove it at once.
        """
        if idle_timeout <= 0 or backoff_initial_s <= 0 or backoff_max_s < backoff_initial_s:
            raise ValueError("need idle_timeout > 0 and 0 < backoff_initial_s <= backoff_max_s")
        super().__init__()
        self.endpoint = endpoint
        self.idle_timeout = idle_timeout
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.grace_s = grace_s
        self._unconfirmed: dict[str, float] = {}  # instance id -> when it counts as left

    async def _run(self) -> None:
        backoff = self.backoff_initial_s
        while True:
            bus = BusClient(self.endpoint, name="registry-watch", timeout=self.idle_timeout, server_role="registry")
            try:
                async for reply in bus.stream(Watch(), idle_timeout=self.idle_timeout):
                    self._drop_unconfirmed()
                    if isinstance(reply, InstanceList):
                        self._apply_snapshot(reply.instances)
                        backoff = self.backoff_initial_s
                    elif isinstance(reply, MembershipEvent):
                        self._apply(reply.change, reply.instance)
                    else:
                        raise BusError(f"unexpected {type(reply).__name__} in the watch stream")
                logger.warning("watch stream from %s ended; reconnecting", self.endpoint)
            except BusError as e:
                logger.warning("watch stream from %s broke (%s); reconnecting in %.1fs", self.endpoint, e, backoff)
            finally:
                await bus.close()
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, self.backoff_max_s)

    def _apply_snapshot(self, instances: list[Instance]) -> None:
        new = {i.id: i for i in instances}
        deadline = time.monotonic() + self.grace_s
        for instance_id in self.instances:
            if instance_id not in new:
                self._unconfirmed.setdefault(instance_id, deadline)
        for instance in new.values():
            self._unconfirmed.pop(instance.id, None)
            self._apply("joined", instance)
        self._drop_unconfirmed()
        self._ready.set()

    def _drop_unconfirmed(self) -> None:
        """Instances missing from snapshots for longer than ``grace_s`` have left."""
        now = time.monotonic()
        for instance_id, deadline in list(self._unconfirmed.items()):
            if now >= deadline:
                del self._unconfirmed[instance_id]
                if instance_id in self.instances:
                    self._apply("left", self.instances[instance_id])

    def _apply(self, change: MembershipChange, instance: Instance) -> None:
        if change in ("left", "expired"):
            self._unconfirmed.pop(instance.id, None)
        super()._apply(change, instance)
