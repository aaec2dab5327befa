"""The etcd operations discovery needs, over ``aetcd`` (an asyncio etcd v3 client), with failover.

Why ``aetcd``: of the asyncio etcd v3 clients on PyPI it is the maintained one
(1.0, 2026) that installs on Python 3.11 with current ``grpcio``/``protobuf`` and
works against Debian's etcd 3.4 (leases, transactions with range comparisons,
watches from a revision).  ``etcetra`` pins ``grpcio==1.62``/``protobuf 4``
(conflicts with anything newer) and was last released in 2024; ``etcd3-py``
speaks the JSON gateway and was last released in 2019; ``python-etcd3`` is
synchronous and unmaintained since 2020; ``etcd3aio`` is young (0.3).

``EtcdStore`` talks to one cluster member at a time; a call that cannot reach it
(connection refused, deadline, no leader) moves to the next member and is retried
there, so losing a member costs one retry.  Every error leaves as a ``BusError``:
``EtcdUnavailable`` when no member answered, ``Compacted`` when a watch's start
revision is gone, ``EtcdError`` otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import aetcd
import aetcd.exceptions as etcd_errors
import msgspec

from common.discovery.etcd_url import EtcdURL
from common.errors import BusError
from common.messages import PROTOCOL_VERSION, Instance

logger = logging.getLogger(__name__)

T = TypeVar("T")
KEEPALIVE_TIME_MS = 5000  # gRPC pings on an idle connection; etcd refuses more frequent ones by default
UNREACHABLE = (etcd_errors.ConnectionFailedError, etcd_errors.ConnectionTimeoutError)


class EtcdError(BusError):
    """etcd answered with an error."""


class EtcdUnavailable(EtcdError):
    """No member of the cluster answered."""


class Compacted(EtcdError):
    """A watch asked for a revision etcd has compacted away: take a fresh snapshot."""


class Record(msgspec.Struct, kw_only=True):
    """The value of an instance's key: the instance, and the protocol its engine speaks."""

    protocol_version: int
    instance: Instance | None = None  # None: only the version was decoded (another protocol)


@dataclass(slots=True)
class Entry:
    """One key under the instances prefix as read: its record and the revision that last wrote it."""

    key: bytes
    record: Record
    mod_revision: int


def encode(instance: Instance) -> bytes:
    return msgspec.msgpack.encode(Record(protocol_version=PROTOCOL_VERSION, instance=instance))


class _Version(msgspec.Struct):
    protocol_version: int = -1


def decode(value: bytes) -> Record:
    """The record; its ``instance`` is None when it is of another protocol version or unreadable."""
    try:
        version = msgspec.msgpack.decode(value, type=_Version).protocol_version
        if version == PROTOCOL_VERSION:
            return msgspec.msgpack.decode(value, type=Record)
    except msgspec.DecodeError:
        version = -1
    return Record(protocol_version=version)


class EtcdStore:
    """The cluster named by an ``EtcdURL``; create it inside a running event loop, ``close()`` it."""

    def __init__(self, url: EtcdURL, *, timeout: float, idle_timeout: float | None = None):
        """``timeout``: of each call; ``idle_timeout``: a silent connection is declared dead after this
        long without an answer to a keepalive ping (default ``timeout``)."""
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.url = url
        self.timeout = timeout
        self.options = {"grpc.keepalive_time_ms": KEEPALIVE_TIME_MS,
                        "grpc.keepalive_timeout_ms": int(1000 * (idle_timeout or timeout))}
        self._member = 0  # index in url.endpoints of the member we talk to
        self._client: aetcd.Client | None = None

    @property
    def member(self) -> str:
        host, port = self.url.endpoints[self._member]
        return f"{host}:{port}"

    def client(self) -> aetcd.Client:
        if self._client is None:
            host, port = self.url.endpoints[self._member]
            self._client = aetcd.Client(host, port, timeout=self.timeout, options=self.options)
        return self._client

    async def next_member(self) -> None:
        """Drop the connection and talk to the next member from now on."""
        await self.close()
        self._member = (self._member + 1) % len(self.url.endpoints)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.close()
            except Exception as e:  # a half-open channel: nothing left to release
                logger.debug("closing the etcd client of %s: %s", self.member, e)

    async def call(self, op: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        """``op(client)`` on the current member, else on each other member in turn."""
        failures = []
        for _ in self.url.endpoints:
            try:
                return await op(self.client())
            except UNREACHABLE as e:
                failures.append(f"{self.member}: {e}")
                await self.next_member()
            except etcd_errors.ClientError as e:
                raise EtcdError(f"etcd {self.member}: {e}") from e
        raise EtcdUnavailable("no etcd member answered (" + "; ".join(failures) + ")")

    # -- what discovery does -------------------------------------------------

    async def snapshot(self) -> tuple[list[Entry], int]:
        """Every instance key, and the revision the read saw."""
        got = await self.call(lambda c: c.get_prefix(self.url.instances_prefix))
        return [Entry(kv.key, decode(kv.value), kv.mod_revision) for kv in got.kvs], got.header.revision

    async def grant(self) -> int:
        """A new lease of the URL's TTL; its id."""
        return (await self.call(lambda c: c.lease(self.url.lease_ttl_s))).id

    async def keepalive(self, lease_id: int) -> bool:
        """Renew the lease; False when it has already expired."""
        reply = await self.call(lambda c: c.refresh_lease(lease_id))
        return reply is not None and reply.TTL > 0

    async def revoke(self, lease_id: int) -> None:
        """Revoke the lease, deleting its keys (an expired lease is fine)."""
        try:
            await self.call(lambda c: c.revoke_lease(lease_id))
        except EtcdError as e:
            if "not found" not in str(e):
                raise

    async def put_unless_changed(self, key: bytes, value: bytes, lease_id: int, since: int,
                                 delete: list[bytes] = ()) -> int | None:
        """Atomically: if no instance key was written after revision ``since``, delete ``delete`` and put
        ``key`` (on the lease); the revision of the write, or None when something changed."""
        return await self._txn(self.url.instances_prefix, since, key, value, lease_id, delete)

    async def put_if_unchanged(self, key: bytes, value: bytes, lease_id: int, mod_revision: int) -> int | None:
        """Atomically: if ``key`` was last written at ``mod_revision``, put it again (on the lease); the
        revision of the write, or None when the key changed or is gone."""
        return await self._txn(key, mod_revision, key, value, lease_id, [])

    async def _txn(self, guard: bytes, since: int, key: bytes, value: bytes, lease_id: int,
                   delete: list[bytes]) -> int | None:
        def txn(c: aetcd.Client):
            t = c.transactions
            if guard == key:
                compare = [t.mod(key) == since]
            else:
                compare = [t.mod(guard, aetcd.utils.prefix_range_end(guard)) < since + 1]
            ops = [*(t.delete(k) for k in delete), t.put(key, value, lease=lease_id)]
            return c.transaction(compare=compare, success=ops, failure=[])

        succeeded, responses = await self.call(txn)
        return responses[-1].response_put.header.revision if succeeded else None

    async def delete(self, key: bytes) -> None:
        await self.call(lambda c: c.delete(key))

    async def events(self, start_revision: int) -> AsyncIterator[tuple[str, bytes, bytes, int]]:
        """``(kind, key, value, revision)`` of each change under the instances prefix from
        ``start_revision`` on ("put" or "delete"), until the stream breaks: then ``EtcdUnavailable``
        (the next call goes to the next member), ``Compacted`` or ``EtcdError``."""
        try:
            watch = await self.client().watch_prefix(self.url.instances_prefix, start_revision=start_revision)
            try:
                async for event in watch:
                    kind = "put" if event.kind == aetcd.rtypes.EventKind.PUT else "delete"
                    yield kind, event.kv.key, event.kv.value, event.kv.mod_revision
            finally:
                await watch.cancel()
        except etcd_errors.RevisionCompactedError as e:
            raise Compacted(str(e)) from e
        except UNREACHABLE as e:
            member = self.member
            await self.next_member()
            raise EtcdUnavailable(f"etcd {member}: {e}") from e
        except etcd_errors.ClientError as e:
            raise EtcdError(f"etcd {self.member}: {e}") from e
        raise EtcdUnavailable(f"etcd {self.member} ended the watch")
