"""The ROUTER end of the bus: decodes requests, runs their handlers, queues their replies."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, Union

import msgspec
import zmq

from common.bus.curve import Peer, insecure_peer, peer_from_user_id, secure_server
from common.bus.outbox import Outbox
from common.bus.reader import Reader
from common.bus.records import (
    DEFAULT_MAX_FRAME_BYTES,
    FLAG_END,
    FLAG_FINAL,
    FLAG_ITEM,
    HEADER,
    KIND_CANCEL,
    MAX_BATCH_RECORDS,
    encode,
)
from common.bus.sockets import tune
from common.errors import PeerError
from common.messages import ErrorReply, Message

log = logging.getLogger(__name__)

Handler = Callable[[Any], Union[Awaitable[Message], AsyncIterator[Message]]]

# (routing id, ZAP User-Id or None) of the message a handler serves: made a ``Peer`` only if it asks
_sender: contextvars.ContextVar[tuple[bytes, str | None]] = contextvars.ContextVar("bus_sender")


def sender() -> Peer:
    """Who sent the message the running handler serves (only inside a handler; ``LookupError`` elsewhere):
    under CURVE its role and public key (the ZAP handler's User-Id), else the ROUTER routing id of its
    connection, which a peer cannot choose for another's connection.  Ownership checks (Register,
    Heartbeat, ``Abort``, ``RenewLease``, ``ReleaseKV``) compare these values and nothing else."""
    identity, user_id = _sender.get()
    return insecure_peer(identity) if user_id is None else peer_from_user_id(user_id)


def require_sender(role: str, action: str) -> Peer:
    """The running handler's sender; ``forbidden`` unless it may act as ``role`` (any peer may, without CURVE)."""
    peer = sender()
    if not peer.acts_as(role):
        raise PeerError("forbidden", f"{peer.role} keys may not {action}: only {role} keys do")
    return peer


class BusServer:
    """ROUTER side: decodes each record into ``accepts``, dispatches it by type, replies.

    With the process's CURVE keys (``curve``) it admits only clients whose keys are of a role in
    ``admits``; a handler learns who sent its message from ``sender()``.
    """

    def __init__(
        self,
        bind: str,
        accepts: Any,
        *,
        name: str,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        admits: frozenset[str] = frozenset(),
    ):
        self.bind = bind
        self.admits = admits
        self.name = name
        self.max_frame_bytes = max_frame_bytes
        self.endpoint = bind
        self._decoder = msgspec.msgpack.Decoder(accepts)
        self._handlers: dict[type, tuple[Handler, bool]] = {}  # type -> (handler, is an async generator)
        self._tasks: dict[tuple[bytes, int], asyncio.Task] = {}
        self._sock: zmq.Socket | None = None
        self._reader: Reader | None = None
        self._outbox: Outbox | None = None
        self._curve = False

    def on(self, msg_type: type, handler: Handler) -> None:
        """Route ``msg_type`` to ``handler`` (a coroutine function or async generator function)."""
        self._handlers[msg_type] = (handler, inspect.isasyncgenfunction(handler))

    async def start(self) -> None:
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        tune(sock, self.max_frame_bytes)
        try:
            self._curve = secure_server(sock, self.admits)
        except BaseException:
            sock.close(linger=0)
            raise
        # Sending to an identity that is no longer connected raises EHOSTUNREACH
        # instead of silently dropping, so we learn the peer is gone.
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        bind = self.bind[:-2] + ":*" if self.bind.endswith(":0") else self.bind
        try:
            sock.bind(bind)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._sock = sock
        self._reader = Reader(sock, self._on_frames)
        self._outbox = Outbox(sock, self._reader, self._send_failed)
        log.debug("%s listening on %s", self.name, self.endpoint)

    async def close(self) -> None:
        """Cancel running handlers, send what they answered, then close the socket."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._sock is not None:
            assert self._outbox is not None
            self._outbox.flush()
            self._sock.close(linger=0)
            self._sock = None

    @property
    def num_active(self) -> int:
        return len(self._tasks)

    # -- receiving ---------------------------------------------------------

    def _on_frames(self, frames: list[bytes]) -> None:
        identity = frames[0]
        if len(frames) < 3 or len(frames) % 2 == 0:
            log.warning("%s: malformed message (%d frames) from %r", self.name, len(frames), identity)
            self._reply(identity, 0, FLAG_FINAL, ErrorReply("bad_frame", "expected [header, body] frame pairs"))
            return
        if len(frames) > 1 + 2 * MAX_BATCH_RECORDS:  # no client batches more: one message must not be a flood
            log.warning("%s: %d records in one message from %r", self.name, len(frames) // 2, identity)
            self._reply(identity, 0, FLAG_FINAL,
                        ErrorReply("bad_frame", f"more than {MAX_BATCH_RECORDS} records in one message"))
            return
        for i in range(1, len(frames), 2):
            header = frames[i]
            if len(header) != HEADER.size:
                log.warning("%s: malformed header from %r", self.name, identity)
                self._reply(identity, 0, FLAG_FINAL, ErrorReply("bad_frame", f"a header has {HEADER.size} bytes"))
                return  # the framing of the rest cannot be trusted
            self._on_record(identity, header, frames[i + 1])

    def _on_record(self, identity: bytes, header: bytes, body: bytes) -> None:
        req_id, kind = HEADER.unpack(header)
        if kind == KIND_CANCEL:
            task = self._tasks.get((identity, req_id))
            if task is not None:
                task.cancel()
            return
        if len(body) > self.max_frame_bytes:
            log.warning("%s: frame of %d bytes over the %d limit", self.name, len(body), self.max_frame_bytes)
            self._reply(identity, req_id, FLAG_FINAL,
                        ErrorReply("too_large", f"frame of {len(body)} bytes exceeds {self.max_frame_bytes}"))
            return
        try:
            msg = self._decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            log.warning("%s: undecodable message from %r: %s", self.name, identity, e)
            self._reply(identity, req_id, FLAG_FINAL, ErrorReply("bad_frame", f"cannot decode message: {e}"))
            return
        entry = self._handlers.get(type(msg))
        if entry is None:
            self._reply(identity, req_id, FLAG_FINAL,
                        ErrorReply("unsupported", f"{self.name} does not handle {type(msg).__name__}"))
            return
        key = (identity, req_id)
        if key in self._tasks:  # a second request under a running one's id could never be cancelled
            self._reply(identity, req_id, FLAG_FINAL, ErrorReply("bad_frame", f"request id {req_id} is in use"))
            return
        # Under CURVE the User-Id the ZAP handler gave the connection, read while its frame is the current one.
        user_id = self._reader.frame.get("User-Id") if self._curve else None  # type: ignore[union-attr]
        self._tasks[key] = asyncio.create_task(self._run(key, *entry, msg, user_id))

    async def _run(self, key: tuple[bytes, int], handler: Handler, streams: bool, msg: Message,
                   user_id: str | None) -> None:
        identity, req_id = key
        _sender.set((identity, user_id))  # this task's own context: seen by the handler only
        try:
            if streams:
                async for item in handler(msg):  # type: ignore[union-attr]
                    self._reply(identity, req_id, FLAG_ITEM, item)
                self._end_stream(identity, req_id)
            else:
                self._reply(identity, req_id, FLAG_FINAL, await handler(msg))  # type: ignore[misc]
        except asyncio.CancelledError:
            pass
        except PeerError as e:
            self._reply(identity, req_id, FLAG_FINAL, ErrorReply(e.code, e.message, e.param))  # type: ignore[arg-type]
        except Exception as e:
            log.exception("%s: handler for %s failed", self.name, type(msg).__name__)
            self._reply(identity, req_id, FLAG_FINAL, ErrorReply("internal", f"{type(e).__name__}: {e}"))
        finally:
            self._tasks.pop(key, None)

    def _reply(self, identity: bytes, req_id: int, flag: int, msg: Message | None) -> None:
        """Queue a record for ``identity``; it leaves with this loop iteration's message to that peer."""
        if self._outbox is not None and self._sock is not None:
            self._outbox.add(identity, HEADER.pack(req_id, flag), b"" if msg is None else encode(msg))

    def _end_stream(self, identity: bytes, req_id: int) -> None:
        """End a stream: its last item becomes the final record while still queued, else an end record follows."""
        if self._outbox is not None and self._sock is not None and not self._outbox.retag_last(
                identity, HEADER.pack(req_id, FLAG_ITEM), HEADER.pack(req_id, FLAG_FINAL)):
            self._reply(identity, req_id, FLAG_END, None)

    def _send_failed(self, identity: bytes | None, _: list[bytes], error: zmq.ZMQError) -> None:
        """A message to ``identity`` was not sent: the peer is gone or not draining; stop its handlers."""
        if isinstance(error, zmq.Again):
            log.warning("%s: peer %r not draining; cancelling its requests", self.name, identity)
        elif error.errno == zmq.EHOSTUNREACH:
            log.info("%s: peer %r is gone; cancelling its requests", self.name, identity)
        else:
            log.error("%s: sending to %r failed: %s", self.name, identity, error)
        for (ident, _), task in list(self._tasks.items()):
            if ident == identity:
                task.cancel()
