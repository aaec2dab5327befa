"""``Registration`` on etcd: each instance is a key on its own lease; heartbeats keep the lease and the load.

Register: grant a lease of the URL's TTL, read every instance key at revision R,
apply the ZMQ registry's rules to what was read (``services.registry.membership``:
the record's checks, dedup by id and by request endpoint, the P/D compatibility
check), then in one transaction -- only if no instance key was written after R --
delete the records this one replaces and put ours on the lease.  A lost race
reads again (up to ``REGISTER_ATTEMPTS`` times).  Records of another protocol
version refuse the registration (``protocol_version``), as a registry of another
version would.

Heartbeat: renew the lease; when the load changed, rewrite the record, only if it
is still the one we wrote.  An expired lease or a record replaced or deleted by
someone else is ``unknown_instance``: the heartbeat loop registers again.
Deregister revokes the lease (etcd deletes the key with it).
"""

from __future__ import annotations

import contextlib
import logging

import msgspec

from common.discovery.etcd_store import EtcdStore, encode
from common.discovery.etcd_url import EtcdURL
from common.discovery.registration import Registration
from common.errors import BusError, PeerError
from common.messages import PROTOCOL_VERSION, Instance, Load, Registered, Role
from common.roles import serves
from services.registry.membership import Membership

logger = logging.getLogger(__name__)

REGISTER_ATTEMPTS = 10  # reads + transactions before giving up when other instances keep registering


class EtcdRegistration(Registration):
    """One engine's registration on an etcd cluster; create it inside a running event loop."""

    def __init__(self, url: str, *, timeout: float = 5.0):
        super().__init__()
        self.endpoint = url
        self.url = EtcdURL.parse(url)
        self.store = EtcdStore(self.url, timeout=timeout)
        self.heartbeat_interval_s = self.url.heartbeat_interval_s
        self._records: dict[str, tuple[int, int, Instance]] = {}  # id -> (lease, revision of our write, record)

    async def register(self, instance: Instance) -> Registered:
        lease_id = await self.store.grant()
        try:
            revision = await self._put(instance, lease_id)
        except BaseException:
            with contextlib.suppress(BusError):  # else the unused lease expires
                await self.store.revoke(lease_id)
            raise
        old = self._records.get(instance.id)
        self._records[instance.id] = (lease_id, revision, instance)
        if old is not None and old[0] != lease_id:
            await self.store.revoke(old[0])  # its key is ours now: the old lease holds nothing
        return Registered(lease_ttl_s=float(self.url.lease_ttl_s), heartbeat_interval_s=self.heartbeat_interval_s)

    async def _put(self, instance: Instance, lease_id: int) -> int:
        """Check ``instance`` against what is registered and write it, atomically; its revision."""
        for _ in range(REGISTER_ATTEMPTS):
            entries, revision = await self.store.snapshot()
            others = [e.record for e in entries if e.record.protocol_version != PROTOCOL_VERSION]
            if others:
                raise PeerError("protocol_version", f"instances registered in {self.endpoint} speak protocol "
                                f"version {others[0].protocol_version}, this instance speaks {PROTOCOL_VERSION}",
                                "protocol_version")
            membership = Membership.holding([e.record.instance for e in entries], float(self.url.lease_ttl_s))
            events = membership.register(instance, PROTOCOL_VERSION, now=0.0)  # refusals raise PeerError
            replaced = [self.url.key(e.instance.id) for e in events if e.change == "left"]
            written = await self.store.put_unless_changed(self.url.key(instance.id), encode(instance), lease_id,
                                                          revision, replaced)
            if written is not None:
                return written
        raise PeerError("overloaded", f"instances kept registering in {self.endpoint} while {instance.id!r} "
                        f"tried {REGISTER_ATTEMPTS} times; try again")

    async def _heartbeat(self, instance_id: str, load: Load) -> None:
        known = self._records.get(instance_id)
        if known is None:
            raise PeerError("unknown_instance", f"instance {instance_id!r} is not registered here", "instance_id")
        lease_id, revision, instance = known
        if not await self.store.keepalive(lease_id):
            del self._records[instance_id]
            raise PeerError("unknown_instance", f"the lease of {instance_id!r} expired", "instance_id")
        if load == instance.load:
            return
        instance = msgspec.structs.replace(instance, load=load)
        written = await self.store.put_if_unchanged(self.url.key(instance_id), encode(instance), lease_id, revision)
        if written is None:
            del self._records[instance_id]
            await self.store.revoke(lease_id)
            raise PeerError("unknown_instance", f"the record of {instance_id!r} was replaced or removed",
                            "instance_id")
        self._records[instance_id] = (lease_id, written, instance)

    async def deregister(self, instance_id: str) -> None:
        known = self._records.pop(instance_id, None)
        if known is not None:
            await self.store.revoke(known[0])
        else:
            await self.store.delete(self.url.key(instance_id))

    async def list(self, role: Role | None = None) -> list[Instance]:
        entries, _ = await self.store.snapshot()
        return [e.record.instance for e in entries if e.record.instance is not None and serves(e.record.instance, role)]

    async def close(self) -> None:
        await self.stop()
        await self.store.close()
