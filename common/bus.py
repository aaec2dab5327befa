"""Asyncio actors over ZMQ ROUTER/DEALER: typed requests, replies and streams.

Wire format: every ZMQ message (after the ROUTER's identity) carries one or
more *records*, each two frames ``[header, body]``:

    client -> server   header = !QB (request id, KIND_REQUEST | KIND_CANCEL)
    server -> client   header = !QB (request id, FLAG_ITEM | FLAG_FINAL | FLAG_END)

``body`` is one msgpack-encoded ``common.messages`` struct (empty for a cancel
and for ``FLAG_END``).  A handler that returns a message answers with one
``FLAG_FINAL`` record; a handler that is an async generator answers with one
``FLAG_ITEM`` record per yielded message and then a ``FLAG_END`` record — or,
when its last item has not left yet as it returns, with that item turned into
the ``FLAG_FINAL`` record that ends the stream (``_Outbox.retag_last``).  Errors
travel as ``ErrorReply`` in a ``FLAG_FINAL`` record and are raised by the client
as ``PeerError``.

Records for one peer queued during one event-loop iteration leave together as
one ZMQ message at the start of the next iteration (``_Outbox``), or as soon as
``MAX_BATCH_RECORDS`` are queued: each ZMQ message costs a wake-up of libzmq's
I/O thread on both ends, far more than the records themselves, so under load
many requests share one, and a stream item followed at once by its end costs
one.  The cap keeps a pipeline of processes working in parallel: with unbounded
batches a loaded gateway hands a whole iteration's requests to an engine at once
and then idles until they all come back, so the processes take turns in
lock-step convoys instead of overlapping.  Records of one request keep their order.

Nothing here blocks on a slow, dead or restarted peer: the server sends with
NOBLOCK and ROUTER_MANDATORY (a vanished or stuck peer's running handlers are
cancelled), the client fails pending calls with ``PeerGone`` when its
connection drops or its send queue is full, and every wait has a finite timeout.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import struct
from collections import deque
from typing import Any, AsyncIterator, Awaitable, Callable, Union

import msgspec
import zmq
from zmq.utils.monitor import parse_monitor_message

from common.errors import CallTimeout, PeerError, PeerGone
from common.messages import ErrorReply, Message, Reply

log = logging.getLogger(__name__)

HEADER = struct.Struct("!QB")
KIND_REQUEST, KIND_CANCEL = 0, 1
FLAG_ITEM, FLAG_FINAL, FLAG_END = 0, 1, 2

DEFAULT_MAX_FRAME_BYTES = 64 << 20
MAX_BATCH_RECORDS = 16  # records per ZMQ message at most (see the module docstring)

Handler = Callable[[Any], Union[Awaitable[Message], AsyncIterator[Message]]]

# Plain ints: pyzmq's enum flags cost a Python-level enum operation on every use.
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)

_encoder = msgspec.msgpack.Encoder()


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def _tune(sock: zmq.Socket, max_frame_bytes: int) -> None:
    """Socket options shared by both ends; each one is a deliberate choice."""
    # Closing must never wait for undelivered messages to a peer that may be gone.
    sock.setsockopt(zmq.LINGER, 0)
    # Bounded queues: a stuck peer costs at most this many queued messages, never
    # unbounded memory; beyond it sends fail fast (EAGAIN) instead of blocking.
    sock.setsockopt(zmq.SNDHWM, 10_000)
    sock.setsockopt(zmq.RCVHWM, 10_000)
    # ZMTP heartbeats find peers that vanished without closing TCP (power loss,
    # partition) so their connection is dropped and pending calls fail.
    sock.setsockopt(zmq.HEARTBEAT_IVL, 1_000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5_000)
    # Hard cap well above the application limit: frames between the two get a
    # typed "too_large" answer, anything beyond is dropped by libzmq before it
    # can exhaust memory.
    sock.setsockopt(zmq.MAXMSGSIZE, 4 * max_frame_bytes + (1 << 20))


def _send(sock: zmq.Socket, frames: list[bytes]) -> None:
    """One multipart message without blocking; raises zmq.Again when the peer's queue is full."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, _NOBLOCK if i == last else _SNDMORE_NOBLOCK)


class _Reader:
    """Feeds every message arriving on a plain zmq socket to ``on_frames``.

    Driven by the event loop's reader on the socket's FD, so a burst of
    messages costs one wake-up.  ZMQ's FD is edge-triggered and a send can
    consume the edge, so after every send ``poke()`` re-checks for input.
    """

    def __init__(self, sock: zmq.Socket, on_frames: Callable[[list[bytes]], None]):
        self._sock = sock
        self._on_frames = on_frames
        self._loop = asyncio.get_running_loop()
        self._fd = sock.getsockopt(zmq.FD)
        self._scheduled = False
        self._loop.add_reader(self._fd, self._drain)
        self.poke()

    def poke(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        sock = self._sock
        while not sock.closed and sock.getsockopt(_EVENTS) & _POLLIN:
            # Frame objects say whether more follow; a getsockopt(RCVMORE) per frame costs more.
            frame = sock.recv(_NOBLOCK, copy=False)
            frames = [frame.bytes]
            while frame.more:
                frame = sock.recv(_NOBLOCK, copy=False)
                frames.append(frame.bytes)
            try:
                self._on_frames(frames)
            except Exception:  # one bad frame must never stop the reader
                log.exception("unexpected error handling a frame")

    def close(self) -> None:
        self._loop.remove_reader(self._fd)


class _Outbox:
    """Records queued per peer during one loop iteration; ``flush`` sends one message per peer.

    A peer's records leave early, without waiting for ``flush``, once
    ``MAX_BATCH_RECORDS`` are queued.  ``key`` is the ROUTER identity (its frame
    leads the message) or None on a DEALER.  ``on_failed(key, frames, error)``
    hears of a message that could not be sent: ``zmq.Again`` (the peer's queue is
    full) or ``zmq.ZMQError`` (EHOSTUNREACH: the peer is gone); ``frames`` are its
    records' frames.
    """

    def __init__(self, sock: zmq.Socket, reader: _Reader,
                 on_failed: Callable[[bytes | None, list[bytes], zmq.ZMQError], None]):
        self._sock = sock
        self._reader = reader
        self._on_failed = on_failed
        self._loop = asyncio.get_running_loop()
        self._queued: dict[bytes | None, list[bytes]] = {}

    def add(self, key: bytes | None, header: bytes, body: bytes) -> None:
        frames = self._queued.get(key)
        if frames is None:
            if not self._queued:
                self._loop.call_soon(self.flush)
            self._queued[key] = [header, body] if key is None else [key, header, body]
        else:
            frames += (header, body)
            if len(frames) >= 2 * MAX_BATCH_RECORDS + (key is not None) and not self._sock.closed:
                self._send(key, self._queued.pop(key))
                self._reader.poke()

    def retag_last(self, key: bytes | None, header: bytes, new_header: bytes) -> bool:
        """If the last record queued for ``key`` has ``header``, give it ``new_header``; True if it did."""
        frames = self._queued.get(key)
        if frames is None or frames[-2] != header:
            return False
        frames[-2] = new_header
        return True

    def flush(self) -> None:
        queued, self._queued = self._queued, {}
        if self._sock.closed:
            return
        for key, frames in queued.items():
            self._send(key, frames)
        if queued:
            self._reader.poke()

    def _send(self, key: bytes | None, frames: list[bytes]) -> None:
        try:
            _send(self._sock, frames)
        except zmq.ZMQError as e:
            self._on_failed(key, frames if key is None else frames[1:], e)


class BusServer:
    """ROUTER side: decodes each record into ``accepts``, dispatches it by type, replies."""

    def __init__(
        self,
        bind: str,
        accepts: Any,
        *,
        name: str,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ):
        self.bind = bind
        self.name = name
        self.max_frame_bytes = max_frame_bytes
        self.endpoint = bind
        self._decoder = msgspec.msgpack.Decoder(accepts)
        self._handlers: dict[type, tuple[Handler, bool]] = {}  # type -> (handler, is an async generator)
        self._tasks: dict[tuple[bytes, int], asyncio.Task] = {}
        self._sock: zmq.Socket | None = None
        self._reader: _Reader | None = None
        self._outbox: _Outbox | None = None

    def on(self, msg_type: type, handler: Handler) -> None:
        """Route ``msg_type`` to ``handler`` (a coroutine function or async generator function)."""
        self._handlers[msg_type] = (handler, inspect.isasyncgenfunction(handler))

    async def start(self) -> None:
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        _tune(sock, self.max_frame_bytes)
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
        self._reader = _Reader(sock, self._on_frames)
        self._outbox = _Outbox(sock, self._reader, self._send_failed)
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
        self._tasks[key] = asyncio.create_task(self._run(key, entry[0], entry[1], msg))

    async def _run(self, key: tuple[bytes, int], handler: Handler, streams: bool, msg: Message) -> None:
        identity, req_id = key
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


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class BusClient:
    """DEALER side for one remote endpoint; concurrent calls are multiplexed by request id."""

    def __init__(
        self,
        endpoint: str,
        *,
        name: str = "",
        timeout: float = 10.0,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ):
        self.endpoint = endpoint
        self.name = name or endpoint
        self.timeout = timeout
        self._decoder = msgspec.msgpack.Decoder(Reply)
        self._ids = itertools.count(1)
        self._pending: dict[int, _Replies | _Callback] = {}
        self._loop = asyncio.get_running_loop()
        ctx = zmq.Context.instance()
        self._sock = ctx.socket(zmq.DEALER)
        _tune(self._sock, max_frame_bytes)
        # Reconnect quickly after a peer restart, backing off to 1 s for a long outage.
        self._sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1_000)
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._sock.connect(endpoint)
        self._closed = False
        self._reader = _Reader(self._sock, self._on_frames)
        self._monitor_reader = _Reader(self._monitor, self._on_monitor_event)
        self._outbox = _Outbox(self._sock, self._reader, self._send_failed)

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
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)

    # -- internals ---------------------------------------------------------

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
            timer = self._loop.call_later(timeout, _wake, waiter)
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
