"""What the gateway sees of discovery: a local copy of the membership, and listeners told of changes.

``MembershipCache`` is the one interface the gateway uses, whatever the backend
(``common.discovery.watcher_for`` picks it from the URL scheme).  A backend runs
``_run`` (started by ``start()``), feeds changes to ``_apply`` and sets ``_ready``
once the cache holds a first complete view.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from typing import Callable

from common.messages import Instance, MembershipChange, Role
from common.roles import serves

logger = logging.getLogger(__name__)

Listener = Callable[[MembershipChange, Instance], None]


class MembershipCache(ABC):
    """``instances`` (id -> Instance) kept current by a backend task; ``close()`` it."""

    endpoint: str  # where discovery is, for logs

    def __init__(self) -> None:
        self.instances: dict[str, Instance] = {}
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
            self._task = asyncio.create_task(self._run(), name="membership-watch")

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait for the first complete view; raises TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            await self._ready.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    @abstractmethod
    async def _run(self) -> None:
        """Follow the backend until cancelled, reconnecting as needed."""

    def _apply(self, change: MembershipChange, instance: Instance) -> None:
        """Update the cache; listeners hear only real changes ("joined" = new to the cache)."""
        old = self.instances.get(instance.id)
        if change in ("left", "expired"):
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
