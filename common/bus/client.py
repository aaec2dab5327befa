"""The DEALER end of the bus: one remote endpoint, concurrent calls multiplexed by request id."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from typing import Any, AsyncIterator, Callable

import msgspec
import zmq
from zmq.utils.monitor import parse_monitor_message

from common.bus.curve import secure_client
from common.bus.endpoints import check_endpoint
from common.bus.outbox import Outbox
from common.bus.reader import Reader
from common.bus.records import (
    DEFAULT_MAX_FRAME_BYTES,
    FLAG_END,
    FLAG_FINAL,
    FLAG_ITEM,
    HEADER,
    KIND_CANCEL,
    KIND_REQUEST,
    encode,
)
from common.bus.sockets import tune
from common.config import ConfigError
from common.errors import BusError, CallTimeout, PeerError, PeerGone
from common.messages import ErrorReply, Message, Reply
from common.tasks import wake

log = logging.getLogger(__name__)


class _Replies:
    """The replies of one pending request, in arrival order, and the waiter of its consumer."""

    __slots__ = ("items", "waiter")

    def __init__(self) -> None:
        self.items: deque = deque()  # (flag, reply) pairs, or an Exception that fails the request
        self.waiter: asyncio.Future | None = None

    def put(self, item: Any) -> None:
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Callback:
    """The replies of one pending request handed straight to ``on_reply`` (see ``BusClient.request``)."""

    __slots__ = ("on_reply",)

    def __init__(self, on_reply: Callable[[int, Any], None]):
        self.on_reply = on_reply

    def put(self, item: Any) -> None:
        if isinstance(item, Exception):
            self.on_reply(FLAG_FINAL, item)
        else:
            self.on_reply(*item)


class BusClient:
    """DEALER side for one remote endpoint; concurrent calls are multiplexed by request id."""

    def __init__(
        self,
        endpoint: str,
        *,
        name: str = "",
        timeout: float = 10.0,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        server_role: str = "engine",
    ):
        """Raises ``BadEndpoint`` (before any socket exists) unless ``endpoint`` is tcp://host:port or ipc://path.

        With the process's CURVE keys (``curve``) it expects the key of a ``server_role`` server."""
        self.endpoint = check_endpoint(endpoint)
        self.name = name or endpoint
        self.timeout = timeout
        self._decoder = msgspec.msgpack.Decoder(Reply)
        self._ids = itertools.count(1)
        self._pending: dict[int, _Replies | _Callback] = {}
        self._loop = asyncio.get_running_loop()
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._monitor: zmq.Socket | None = None
        try:
            tune(self._sock, max_frame_bytes)
            secure_client(self._sock, server_role)
            # Reconnect quickly after a peer restart, backing off to 1 s for a long outage.
            self._sock.setsockopt(zmq.RECONNECT_IVL, 100)
            self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1_000)
            self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            self._sock.connect(endpoint)
        except (zmq.ZMQError, ConfigError):  # whatever is refused, no socket may outlive the failed client
            self._close_sockets()
            raise
        self._closed = False
        self._reader = Reader(self._sock, self._on_frames)
        self._monitor_reader = Reader(self._monitor, self._on_monitor_event)
        self._outbox = Outbox(self._sock, self._reader, self._send_failed)

    async def call(self, msg: Message, timeout: float | None = None) -> Message:
        """Send ``msg`` and return its reply; raises CallTimeout, PeerGone or PeerError."""
        req_id, replies = self._send(msg)
        try:
            flag, reply = await self._next(replies, self.timeout if timeout is None else timeout)
            if flag == FLAG_ITEM:  # the handler streams: take the first item, stop the rest
                self._send_cancel(req_id)
            if flag == FLAG_END:
                raise PeerError("internal", "empty stream where one reply was expected")
            return reply
        except asyncio.CancelledError:
            self._send_cancel(req_id)
            raise
        finally:
            self._pending.pop(req_id, None)

    async def stream(self, msg: Message, idle_timeout: float | None = None,
                     first_timeout: float | None = None) -> AsyncIterator[Message]:
        """Yield every reply of a streaming handler; leaving early cancels it on the server.

        The first reply must come within ``first_timeout`` (default: ``idle_timeout``),
        each later one within ``idle_timeout`` of the previous (default: the client's timeout).
        """
        req_id, replies = self._send(msg)
        idle = self.timeout if idle_timeout is None else idle_timeout
        timeout = idle if first_timeout is None else first_timeout
        done = False
        try:
            while True:
                flag, reply = await self._next(replies, timeout)
                timeout = idle
                if flag == FLAG_END:
                    done = True
                    return
                if flag == FLAG_FINAL:
                    done = True
                    yield reply
                    return
                yield reply
        finally:
            if not done:
                self._send_cancel(req_id)
            self._pending.pop(req_id, None)

    def request(self, msg: Message, on_reply: Callable[[int, Any], None]) -> int:
        """Send ``msg`` without waiting: ``on_reply(flag, reply)`` hears each reply as the reader
        takes it in, ``flag`` saying whether more follow (``FLAG_ITEM``) or not (``FLAG_FINAL``, or
        ``FLAG_END`` with ``reply`` None).  A failure arrives once as ``(FLAG_FINAL, BusError)``:
        ``PeerError`` for an error reply, ``PeerGone`` when the connection drops.  The caller owns
        timeouts and must ``forget`` the request id once done (``cancel`` to stop it early)."""
        if self._closed:
            raise PeerGone(f"client for {self.endpoint} is closed")
        body = encode(msg)
        req_id = next(self._ids)
        self._pending[req_id] = _Callback(on_reply)
        self._outbox.add(None, HEADER.pack(req_id, KIND_REQUEST), body)
        return req_id

    def ask(self, msg: Message, what: str, result: Callable[[Any], Any] = lambda reply: reply) -> asyncio.Future:
        """``result`` of the reply to ``msg`` as a future, the request queued before this returns (``request``;
        ``PeerGone`` when the client is closed); the future fails with the reply's ``BusError``, or with
        ``CallTimeout`` (``what``: the request's name in its message) after the client's timeout."""
        loop = asyncio.get_running_loop()
        answered = loop.create_future()

        def on_reply(_: int, reply: Any) -> None:
            if answered.done():
                return
            if isinstance(reply, BusError):
                answered.set_exception(reply)
            else:
                answered.set_result(result(reply))

        def expire() -> None:
            if not answered.done():
                answered.set_exception(CallTimeout(f"no answer to {what} from {self.endpoint} within "
                                                   f"{self.timeout:g} s"))

        req_id = self.request(msg, on_reply)
        timer = loop.call_later(self.timeout, expire)
        answered.add_done_callback(lambda _: (timer.cancel(), self.forget(req_id)))
        return answered

    def forget(self, req_id: int) -> None:
        """A request from ``request`` has ended: drop its state (later replies are ignored)."""
        self._pending.pop(req_id, None)

    def cancel(self, req_id: int) -> None:
        """Stop a request from ``request`` on the server and ``forget`` it."""
        if self._pending.pop(req_id, None) is not None:
            self._send_cancel(req_id)

    async def close(self) -> None:
        """Send what is queued (cancels included), fail pending calls with PeerGone, close."""
        if self._closed:
            return
        self._closed = True
        self._outbox.flush()
        self._reader.close()
        self._monitor_reader.close()
        self._fail_all(PeerGone(f"client for {self.endpoint} closed"))
        self._close_sockets()

    # -- internals ---------------------------------------------------------

    def _close_sockets(self) -> None:
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
        self._sock.close(linger=0)

    def _send(self, msg: Message) -> tuple[int, _Replies]:
        if self._closed:
            raise PeerGone(f"client for {self.endpoint} is closed")
        body = encode(msg)
        req_id = next(self._ids)
        replies = self._pending[req_id] = _Replies()
        self._outbox.add(None, HEADER.pack(req_id, KIND_REQUEST), body)
        return req_id, replies

    def _send_cancel(self, req_id: int) -> None:
        if not self._closed:
            self._outbox.add(None, HEADER.pack(req_id, KIND_CANCEL), b"")

    def _send_failed(self, _: bytes | None, frames: list[bytes], error: zmq.ZMQError) -> None:
        """The outbox's message was not sent (queue full: the peer is not draining): fail its requests."""
        gone = PeerGone(f"{self.endpoint}: send failed ({error}); the peer is not draining")
        for header in frames[::2]:
            req_id, kind = HEADER.unpack(header)
            replies = self._pending.get(req_id) if kind == KIND_REQUEST else None
            if replies is not None:
                replies.put(gone)

    async def _next(self, replies: _Replies, timeout: float) -> tuple[int, Message]:
        items = replies.items
        if not items:
            waiter = replies.waiter = self._loop.create_future()
            timer = self._loop.call_later(timeout, wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                replies.waiter = None
            if not items:
                raise CallTimeout(f"{self.endpoint}: no reply within {timeout:g} s")
        item = items.popleft()
        if isinstance(item, Exception):
            raise item
        return item

    def _on_frames(self, frames: list[bytes]) -> None:
        if len(frames) % 2:
            log.warning("%s: dropping malformed reply (%d frames)", self.name, len(frames))
            return
        for i in range(0, len(frames), 2):
            if len(frames[i]) != HEADER.size:
                log.warning("%s: dropping malformed reply (bad header)", self.name)
                return
            self._on_record(frames[i], frames[i + 1])

    def _on_record(self, header: bytes, body: bytes) -> None:
        req_id, flag = HEADER.unpack(header)
        replies = self._pending.get(req_id)
        try:
            reply = None if flag == FLAG_END else self._decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            log.warning("%s: undecodable reply: %s", self.name, e)
            reply = ErrorReply("bad_frame", f"undecodable reply: {e}")
            flag = FLAG_FINAL
        if req_id == 0 and isinstance(reply, ErrorReply):
            log.warning("%s: peer rejected a frame: %s", self.name, reply.message)
        elif replies is not None:  # an error reply fails the request, whichever way it is waited for
            replies.put(PeerError(reply.code, reply.message, reply.param) if isinstance(reply, ErrorReply)
                        else (flag, reply))

    def _on_monitor_event(self, frames: list[bytes]) -> None:
        if parse_monitor_message(frames)["event"] == zmq.EVENT_DISCONNECTED:
            self._fail_all(PeerGone(f"{self.endpoint} disconnected"))

    def _fail_all(self, error: Exception) -> None:
        for replies in list(self._pending.values()):
            replies.put(error)
