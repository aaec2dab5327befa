"""Talking to the registry: register + heartbeats (engines), watch + cache (gateway).

``RegistryClient`` registers an instance and keeps its lease alive; a
heartbeat answered with ``unknown_instance`` (the registry restarted, or our
lease expired) re-registers at once, and an unreachable registry is logged
and retried every interval — the loop never dies.

``MembershipWatcher`` mirrors the registry's membership in ``instances`` from
the ``Watch`` stream.  When the stream breaks (peer gone, idle timeout, error)
it reconnects with exponential backoff; every snapshot the registry sends
replaces the cache, and the implied joined/updated/left changes go to the
listeners, so a registry restart is seen as a consistent sequence of changes.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import Awaitable, Callable, Union

import msgspec

from common.bus import BusClient
from common.errors import BusError, PeerError
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
from common.roles import serves

logger = logging.getLogger(__name__)

LoadFn = Callable[[], Union[Load, Awaitable[Load]]]
Listener = Callable[[MembershipChange, Instance], None]


def expect(reply: object, cls: type) -> None:
    if not isinstance(reply, cls):
        raise BusError(f"registry answered {type(reply).__name__}, expected {cls.__name__}")


class RegistryClient:
    """Register / deregister / list, and a heartbeat task for one instance.

    Create it inside a running event loop (it owns a ``BusClient``); ``close()`` it.
    """

    def __init__(self, endpoint: str, *, timeout: float = 5.0):
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.endpoint = endpoint
        self.timeout = timeout
        self.heartbeat_interval_s = 1.0  # replaced by the registry's value at registration
        self._bus = BusClient(endpoint, name="registry", timeout=timeout, server_role="registry")
        self._heartbeats: asyncio.Task | None = None
        self._instance_id: str | None = None

    async def register(self, instance: Instance) -> Registered:
        """Register (or replace) ``instance``; raises PeerError("incompatible" | "protocol_version" | ...)."""
        reply = await self._bus.call(Register(instance=instance))
        expect(reply, Registered)
        self.heartbeat_interval_s = reply.heartbeat_interval_s
        return reply

    async def deregister(self, instance_id: str) -> None:
        expect(await self._bus.call(Deregister(instance_id=instance_id)), Ack)

    async def list(self, role: Role | None = None) -> list[Instance]:
        """Instances that serve ``role`` (``common.roles.serves``: the exact role; None: all)."""
        reply = await self._bus.call(ListInstances(role=role))
        expect(reply, InstanceList)
        return reply.instances

    async def heartbeat_loop(self, instance: Instance, load_fn: LoadFn, *, registered: bool = False) -> None:
        """Run forever: heartbeat every interval with ``load_fn()``; (re-)register when needed."""
        while True:
            try:
                load = load_fn()
                if inspect.isawaitable(load):
                    load = await load
                if not registered:
                    await self.register(msgspec.structs.replace(instance, load=load))
                    registered = True
                    logger.info("registered %s with %s", instance.id, self.endpoint)
                else:
                    expect(await self._bus.call(Heartbeat(instance_id=instance.id, load=load)), Ack)
            except PeerError as e:
                if e.code == "unknown_instance":
                    logger.warning("registry forgot %s; registering again", instance.id)
                    registered = False
                    continue
                logger.error("registry refused %s: %s", instance.id, e)
            except BusError as e:
                logger.warning("registry %s unreachable: %s", self.endpoint, e)
            except Exception:
                logger.exception("heartbeat for %s failed", instance.id)
            await asyncio.sleep(self.heartbeat_interval_s)

    async def start_heartbeats(self, instance: Instance, load_fn: LoadFn) -> Registered:
        """Register now (errors propagate), then keep the lease alive in a task until ``stop()``."""
        if self._heartbeats is not None:
            raise RuntimeError(f"heartbeats already running for {self._instance_id}")
        registered = await self.register(instance)
        self._instance_id = instance.id
        self._heartbeats = asyncio.create_task(
            self.heartbeat_loop(instance, load_fn, registered=True), name=f"heartbeat-{instance.id}"
        )
        return registered

    async def stop(self) -> None:
        """Stop heartbeating and deregister (best effort: a down registry lets the lease expire)."""
        if self._heartbeats is None:
            return
        self._heartbeats.cancel()
        await asyncio.gather(self._heartbeats, return_exceptions=True)
        self._heartbeats = None
        instance_id, self._instance_id = self._instance_id, None
        try:
            await self.deregister(instance_id)
        except BusError as e:
            logger.warning("could not deregister %s (its lease will expire): %s", instance_id, e)

    async def close(self) -> None:
        await self.stop()
        await self._bus.close()


class MembershipWatcher:
    """A local, self-healing copy of the registry's membership."""

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
        self.endpoint = endpoint
        self.idle_timeout = idle_timeout
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.grace_s = grace_s
        self.instances: dict[str, Instance] = {}
        self._unconfirmed: dict[str, float] = {}  # instance id -> when it counts as left
        self._listeners: list[Listener] = []
        self._ready = asyncio.Event()
        self._task: asyncio.Task | None = None

    def add_listener(self, callback: Listener) -> None:
        """``callback(change, instance)`` runs on the event loop after the cache changed."""
        self._listeners.append(callback)

    def by_role(self, role: Role | None) -> list[Instance]:
        """Cached instances that serve ``role`` (``common.roles.serves``: the exact role; None: all)."""
        return [i for i in self.instances.values() if serves(i, role)]

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="registry-watch")

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait for the first snapshot; raises TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            await self._ready.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

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
        """Update the cache; listeners hear only real changes ("joined" = new to the cache)."""
        old = self.instances.get(instance.id)
        if change in ("left", "expired"):
            self._unconfirmed.pop(instance.id, None)
            if old is None:
                return
            del self.instances[instance.id]
        else:
            if old == instance:
                return
            change = "joined" if old is None else "updated"
            self.instances[instance.id] = instance
        logger.debug("membership: %s %s", change, instance.id)
        for callback in self._listeners:
            try:
                callback(change, instance)
            except Exception:
                logger.exception("membership listener %r failed on %s %s", callback, change, instance.id)
