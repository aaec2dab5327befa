"""What an engine does with discovery: register, keep its lease alive, deregister.

``Registration`` is the one interface engines use, whatever the backend
(``common.discovery.registration_for`` picks it from the URL scheme).  A backend
implements ``register``, ``deregister``, ``list`` and ``_heartbeat``; this base
runs the heartbeat loop: a heartbeat refused with ``unknown_instance`` (our
record is gone: lease expired, registry restarted, record replaced) registers
again at once, and an unreachable backend is logged and retried every
interval -- the loop never dies.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from abc import ABC, abstractmethod
from typing import Awaitable, Callable, Union

import msgspec

from common.errors import BusError, PeerError
from common.messages import Instance, Load, Registered, Role

logger = logging.getLogger(__name__)

LoadFn = Callable[[], Union[Load, Awaitable[Load]]]


class Registration(ABC):
    """Register / deregister / list, and a heartbeat task for one instance; ``close()`` it."""

    endpoint: str  # where discovery is, for logs
    heartbeat_interval_s: float  # how often heartbeat_loop beats (the backend may change it at registration)

    def __init__(self) -> None:
        self._heartbeats: asyncio.Task | None = None
        self._instance_id: str | None = None

    @abstractmethod
    async def register(self, instance: Instance) -> Registered:
        """Register (or replace) ``instance``; raises PeerError("incompatible" | "protocol_version" | ...)."""

    @abstractmethod
    async def deregister(self, instance_id: str) -> None:
        """Remove the instance at once (idempotent)."""

    @abstractmethod
    async def list(self, role: Role | None = None) -> list[Instance]:
        """Instances that serve ``role`` (``common.roles.serves``: the exact role; None: all)."""

    @abstractmethod
    async def _heartbeat(self, instance_id: str, load: Load) -> None:
        """Keep the lease and report ``load``; PeerError("unknown_instance") when the record is gone."""

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
                    await self._heartbeat(instance.id, load)
            except PeerError as e:
                if e.code == "unknown_instance":
                    logger.warning("discovery forgot %s; registering again", instance.id)
                    registered = False
                    continue
                logger.error("discovery refused %s: %s", instance.id, e)
            except BusError as e:
                logger.warning("discovery %s unreachable: %s", self.endpoint, e)
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
        """Stop heartbeating and deregister (best effort: an unreachable backend lets the lease expire)."""
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
        """``stop()``, then release the connection."""
        await self.stop()
