"""``MembershipCache`` on etcd: a snapshot of the instances prefix at revision R, then a watch from R + 1.

Each watch event carries its revision; after a disconnect (member gone, idle
connection, error) the watch resumes, on the next member, from the revision
after the last one applied, so no change is missed or applied twice.  Only when
etcd has compacted that revision away does it take a new snapshot, which
replaces the cache (instances missing from it have left).  The cache is kept
while reconnecting: routing goes on with what was last known.
"""

from __future__ import annotations

import asyncio
import logging

from common.discovery.cache import MembershipCache
from common.discovery.etcd_store import Compacted, EtcdStore, Entry, decode
from common.discovery.etcd_url import EtcdURL
from common.errors import BusError
from common.messages import Instance

logger = logging.getLogger(__name__)


class EtcdWatcher(MembershipCache):
    """A local, self-healing copy of the instances registered in etcd."""

    def __init__(self, url: str, *, idle_timeout: float = 5.0, backoff_initial_s: float = 0.1,
                 backoff_max_s: float = 2.0):
        """``idle_timeout``: a connection silent this long (no answer to keepalive pings) is dead."""
        if idle_timeout <= 0 or backoff_initial_s <= 0 or backoff_max_s < backoff_initial_s:
            raise ValueError("need idle_timeout > 0 and 0 < backoff_initial_s <= backoff_max_s")
        super().__init__()
        self.endpoint = url
        self.url = EtcdURL.parse(url)
        self.store = EtcdStore(self.url, timeout=idle_timeout, idle_timeout=idle_timeout)
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.revision: int | None = None  # last revision applied; None: a snapshot is needed
        self._ids: dict[bytes, str] = {}  # key -> instance id, to name the instance a delete removes

    async def _run(self) -> None:
        backoff = self.backoff_initial_s
        while True:
            try:
                if self.revision is None:
                    self._apply_snapshot(*await self.store.snapshot())
                async for kind, key, value, revision in self.store.events(self.revision + 1):
                    self._apply_event(kind, key, value)
                    self.revision = revision
                    backoff = self.backoff_initial_s
            except Compacted as e:
                logger.warning("watch of %s: %s; taking a new snapshot", self.endpoint, e)
                self.revision = None
                continue
            except BusError as e:
                logger.warning("watch of %s broke (%s); resuming from revision %s in %.1fs", self.endpoint, e,
                               self.revision, backoff)
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, self.backoff_max_s)

    async def close(self) -> None:
        await super().close()
        await self.store.close()

    def _apply_snapshot(self, entries: list[Entry], revision: int) -> None:
        readable = {e.key: e.record.instance for e in entries if self._readable(e.key, e.record.instance)}
        self._ids = {key: instance.id for key, instance in readable.items()}
        present = {instance.id for instance in readable.values()}
        for instance in [i for i in self.instances.values() if i.id not in present]:
            self._apply("left", instance)
        for instance in readable.values():
            self._apply("joined", instance)
        self.revision = revision
        self._ready.set()

    def _apply_event(self, kind: str, key: bytes, value: bytes) -> None:
        if kind == "delete":
            instance_id = self._ids.pop(key, None)
            if instance_id is not None and instance_id in self.instances:
                self._apply("left", self.instances[instance_id])
            return
        instance = decode(value).instance
        if self._readable(key, instance):
            self._ids[key] = instance.id
            self._apply("joined", instance)

    def _readable(self, key: bytes, instance: Instance | None) -> bool:
        if instance is None:
            logger.warning("%s: ignoring %s, written by an engine of another protocol version", self.endpoint,
                           key.decode(errors="replace"))
        return instance is not None
