"""The registry service: a ROUTER answering ``RegistryRequest``s over the bus.

``Register`` / ``Heartbeat`` / ``Deregister`` / ``ListInstances`` are plain
calls.  ``Watch`` is a stream: an ``InstanceList`` snapshot, then one
``MembershipEvent`` per change.  While no change happens for
``heartbeat_interval_s`` the stream repeats the snapshot, so a watcher can
detect a dead registry with an idle timeout and heals any gap by
reconciling.  A watcher that falls ``watch_queue_size`` events behind is cut
off with ``ErrorReply("overloaded")``; it reconnects and gets a fresh snapshot.
Lease expiry is exact: a timer sleeps until the oldest lease runs out.

With CURVE keys the registry admits engine and gateway keys; only an engine key
may register, heartbeat or deregister, and only for an instance it owns
(``membership``: the key that registered it).
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import AsyncIterator, Literal

from common.bus import BusServer
from common.bus.curve import REGISTRY_ADMITS, BusSecurity
from common.bus.server import require_sender
from common.config import opt, require
from common.errors import PeerError
from common.messages import (
    Ack,
    Deregister,
    Heartbeat,
    InstanceList,
    ListInstances,
    MembershipEvent,
    Register,
    Registered,
    RegistryRequest,
    Watch,
)
from services.registry.membership import Membership

logger = logging.getLogger(__name__)

ZMQ_ENDPOINT = re.compile(r"^(tcp://[^:/\s]+:(\d+|\*)|ipc://\S+|inproc://\S+)$")


@dataclass
class RegistryConfig(BusSecurity):
    bind: str = opt("tcp://127.0.0.1:7100", "ROUTER address to bind (tcp://host:port, port 0 = any free port)")
    heartbeat_interval_s: float = opt(1.0, "heartbeat interval told to instances at registration")
    lease_ttl_s: float = opt(3.0, "expire an instance after this long without a heartbeat (> heartbeat interval)")
    watch_queue_size: int = opt(1024, "events a slow watcher may fall behind before it is cut off")
    max_frame_bytes: int = opt(16 << 20, "largest request frame accepted, in bytes")
    log_level: Literal["debug", "info", "warning", "error"] = opt("info", "logging level")

    def validate(self) -> None:
        require(bool(ZMQ_ENDPOINT.match(self.bind)), "bind", f"{self.bind!r} is not a zmq endpoint like tcp://127.0.0.1:7100")
        require(self.heartbeat_interval_s > 0, "heartbeat_interval_s", "must be > 0")
        require(
            self.lease_ttl_s > self.heartbeat_interval_s,
            "lease_ttl_s",
            f"must be > heartbeat interval ({self.heartbeat_interval_s}), got {self.lease_ttl_s}",
        )
        require(self.watch_queue_size > 0, "watch_queue_size", "must be > 0")
        require(self.max_frame_bytes >= 4096, "max_frame_bytes", "must be >= 4096")


class Registry:
    """Membership table + bus server + lease timer + watcher fan-out."""

    def __init__(self, config: RegistryConfig):
        config.validate()
        self.config = config
        self.membership = Membership(config.lease_ttl_s)
        self.watchers: set[asyncio.Queue[MembershipEvent | None]] = set()
        self.server = BusServer(config.bind, RegistryRequest, name="registry", max_frame_bytes=config.max_frame_bytes,
                                admits=REGISTRY_ADMITS)
        self.server.on(Register, self._register)
        self.server.on(Heartbeat, self._heartbeat)
        self.server.on(Deregister, self._deregister)
        self.server.on(ListInstances, self._list)
        self.server.on(Watch, self._watch)
        self._expiry_task: asyncio.Task | None = None

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    async def start(self) -> None:
        await self.server.start()
        self._expiry_task = asyncio.create_task(self._expire_loop(), name="registry-expiry")
        logger.info(
            "registry on %s (heartbeat %.2fs, lease %.2fs)",
            self.endpoint,
            self.config.heartbeat_interval_s,
            self.config.lease_ttl_s,
        )

    async def close(self) -> None:
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            await asyncio.gather(self._expiry_task, return_exceptions=True)
        await self.server.close()

    # -- fan-out ------------------------------------------------------------

    def _publish(self, events: list[MembershipEvent]) -> None:
        for queue in list(self.watchers):
            for event in events:
                try:
                    queue.put_nowait(event)
                except asyncio.QueueFull:
                    logger.warning("watcher fell %d events behind; cutting it off", queue.qsize())
                    self.watchers.discard(queue)
                    while not queue.empty():
                        queue.get_nowait()
                    queue.put_nowait(None)
                    break

    async def _expire_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            self._publish(self.membership.expire(now))
            deadline = self.membership.next_deadline()
            delay = self.config.lease_ttl_s if deadline is None else deadline - now
            await asyncio.sleep(max(delay, 0.001))

    # -- handlers -----------------------------------------------------------

    async def _register(self, msg: Register) -> Registered:
        now = asyncio.get_running_loop().time()
        self._publish(self.membership.register(msg.instance, msg.protocol_version, now, owner("register")))
        return Registered(lease_ttl_s=self.config.lease_ttl_s, heartbeat_interval_s=self.config.heartbeat_interval_s)

    async def _heartbeat(self, msg: Heartbeat) -> Ack:
        now = asyncio.get_running_loop().time()
        self._publish(self.membership.heartbeat(msg.instance_id, msg.load, now, owner("heartbeat")))
        return Ack()

    async def _deregister(self, msg: Deregister) -> Ack:
        self._publish(self.membership.deregister(msg.instance_id, owner("deregister")))
        return Ack()

    async def _list(self, msg: ListInstances) -> InstanceList:
        return InstanceList(instances=self.membership.list(msg.role))

    async def _watch(self, msg: Watch) -> AsyncIterator[InstanceList | MembershipEvent]:
        queue: asyncio.Queue[MembershipEvent | None] = asyncio.Queue(self.config.watch_queue_size)
        self.watchers.add(queue)
        try:
            yield InstanceList(instances=self.membership.list())
            while True:
                try:
                    async with asyncio.timeout(self.config.heartbeat_interval_s):
                        event = await queue.get()
                except TimeoutError:
                    if queue.empty():  # a snapshot is consistent only with no event pending
                        yield InstanceList(instances=self.membership.list())
                    continue
                if event is None:
                    raise PeerError("overloaded", "watcher fell too far behind; reconnect for a fresh snapshot")
                yield event
        finally:
            self.watchers.discard(queue)


def owner(action: str) -> str | None:
    """The key the sender binds an instance record to (None without CURVE); ``forbidden`` unless it is an engine."""
    peer = require_sender("engine", action)
    return None if peer.role is None else peer.id


async def serve(config: RegistryConfig, *, ready: asyncio.Event | None = None) -> None:
    """Run the registry until cancelled, then close its socket and return."""
    registry = Registry(config)
    await registry.start()
    try:
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        await registry.close()
        logger.info("registry stopped")
