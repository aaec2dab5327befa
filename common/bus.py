"""Asyncio actors over ZMQ ROUTER/DEALER: typed requests, replies and streams.

Wire format (every frame after the ROUTER's identity):

    client -> server   [header, body]   header = !QB (request id, KIND_REQUEST | KIND_CANCEL)
    server -> client   [header, body]   header = !QB (request id, FLAG_ITEM | FLAG_FINAL | FLAG_END)

``body`` is one msgpack-encoded ``common.messages`` struct (empty for a cancel
and for ``FLAG_END``).  A handler that returns a message answers with one
``FLAG_FINAL`` frame; a handler that is an async generator answers with one
``FLAG_ITEM`` frame per yielded message and then a ``FLAG_END`` frame.  Errors
travel as ``ErrorReply`` in a ``FLAG_FINAL`` frame and are raised by the client
as ``PeerError``.

Nothing here blocks on a slow, dead or restarted peer: the server sends with
NOBLOCK and ROUTER_MANDATORY (a vanished peer's requests are cancelled), the
client fails pending calls with ``PeerGone`` when its connection drops, and
every wait has a finite timeout.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import struct
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

Handler = Callable[[Any], Union[Awaitable[Message], AsyncIterator[Message]]]

_encoder = msgspec.msgpack.Encoder()


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def _tune(sock: zmq.Socket, max_frame_bytes: int) -> None:
    """Socket options shared by both ends; each one is a deliberate choice."""
    # Closing must never wait for undelivered messages to a peer that may be gone.
    sock.setsockopt(zmq.LINGER, 0)
    # Bounded queues: a stuck peer costs at most this many queued frames, never
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
        while not sock.closed and sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = sock.recv_multipart(flags=zmq.NOBLOCK)
            try:
                self._on_frames(frames)
            except Exception:  # one bad frame must never stop the reader
                log.exception("unexpected error handling a frame")

    def close(self) -> None:
        self._loop.remove_reader(self._fd)


class BusServer:
    """ROUTER side: decodes each frame into ``accepts``, dispatches it by type, replies."""

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
        self._handlers: dict[type, Handler] = {}
        self._tasks: dict[tuple[bytes, int], asyncio.Task] = {}
        self._sock: zmq.Socket | None = None
        self._reader: _Reader | None = None

    def on(self, msg_type: type, handler: Handler) -> None:
        """Route ``msg_type`` to ``handler`` (a coroutine function or async generator function)."""
        self._handlers[msg_type] = handler

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
        log.debug("%s listening on %s", self.name, self.endpoint)

    async def close(self) -> None:
        """Cancel running handlers, then close the socket."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    @property
    def num_active(self) -> int:
        return len(self._tasks)

    # -- receiving ---------------------------------------------------------

    def _on_frames(self, frames: list[bytes]) -> None:
        identity = frames[0]
        if len(frames) != 3 or len(frames[1]) != HEADER.size:
            log.warning("%s: malformed frame (%d parts) from %r", self.name, len(frames), identity)
            self._reply(identity, 0, FLAG_FINAL, ErrorReply("bad_frame", "expected [header, body] frames"))
            return
        req_id, kind = HEADER.unpack(frames[1])
        if kind == KIND_CANCEL:
            task = self._tasks.get((identity, req_id))
            if task is not None:
                task.cancel()
            return
        body = frames[2]
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
        handler = self._handlers.get(type(msg))
        if handler is None:
            self._reply(identity, req_id, FLAG_FINAL,
                        ErrorReply("unsupported", f"{self.name} does not handle {type(msg).__name__}"))
            return
        key = (identity, req_id)
        task = asyncio.create_task(self._run(key, handler, msg))
        self._tasks[key] = task

    async def _run(self, key: tuple[bytes, int], handler: Handler, msg: Message) -> None:
        identity, req_id = key
        try:
            if inspect.isasyncgenfunction(handler):
                async for item in handler(msg):  # type: ignore[union-attr]
                    if not self._reply(identity, req_id, FLAG_ITEM, item):
                        return  # peer gone or not draining: the generator is closed
                self._reply(identity, req_id, FLAG_END, None)
            else:
                reply = await handler(msg)  # type: ignore[misc]
                self._reply(identity, req_id, FLAG_FINAL, reply)
        except asyncio.CancelledError:
            pass
        except PeerError as e:
            self._reply(identity, req_id, FLAG_FINAL, ErrorReply(e.code, e.message, e.param))  # type: ignore[arg-type]
        except Exception as e:
            log.exception("%s: handler for %s failed", self.name, type(msg).__name__)
            self._reply(identity, req_id, FLAG_FINAL, ErrorReply("internal", f"{type(e).__name__}: {e}"))
        finally:
            self._tasks.pop(key, None)

    def _reply(self, identity: bytes, req_id: int, flag: int, msg: Message | None) -> bool:
        """Send without blocking; False when the peer is gone or its queue is full."""
        if self._sock is None:
            return False
        body = b"" if msg is None else encode(msg)
        try:
            self._sock.send_multipart([identity, HEADER.pack(req_id, flag), body], flags=zmq.NOBLOCK)
            if self._reader is not None:
                self._reader.poke()
            return True
        except zmq.Again:
            log.warning("%s: peer %r not draining; dropping request %d", self.name, identity, req_id)
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            log.info("%s: peer %r is gone; cancelling its requests", self.name, identity)
            for (ident, _), task in list(self._tasks.items()):
                if ident == identity and task is not asyncio.current_task():
                    task.cancel()
        return False


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
        self._pending: dict[int, asyncio.Queue] = {}
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

    async def call(self, msg: Message, timeout: float | None = None) -> Message:
        """Send ``msg`` and return its reply; raises CallTimeout, PeerGone or PeerError."""
        req_id, queue = self._send(msg)
        try:
            flag, reply = await self._next(queue, self.timeout if timeout is None else timeout)
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

    async def stream(self, msg: Message, idle_timeout: float | None = None) -> AsyncIterator[Message]:
        """Yield every reply of a streaming handler; leaving early cancels it on the server."""
        req_id, queue = self._send(msg)
        done = False
        try:
            while True:
                flag, reply = await self._next(queue, self.timeout if idle_timeout is None else idle_timeout)
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

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._reader.close()
        self._monitor_reader.close()
        self._fail_all(PeerGone(f"client for {self.endpoint} closed"))
        self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)

    # -- internals ---------------------------------------------------------

    def _send(self, msg: Message) -> tuple[int, asyncio.Queue]:
        if self._closed:
            raise PeerGone(f"client for {self.endpoint} is closed")
        req_id = next(self._ids)
        queue: asyncio.Queue = asyncio.Queue()
        self._pending[req_id] = queue
        try:
            self._sock.send_multipart([HEADER.pack(req_id, KIND_REQUEST), encode(msg)], flags=zmq.NOBLOCK)
            self._reader.poke()
        except zmq.Again:
            self._pending.pop(req_id, None)
            raise PeerGone(f"{self.endpoint}: send queue full (peer not draining)")
        return req_id, queue

    def _send_cancel(self, req_id: int) -> None:
        if self._closed:
            return
        try:
            self._sock.send_multipart([HEADER.pack(req_id, KIND_CANCEL), b""], flags=zmq.NOBLOCK)
            self._reader.poke()
        except zmq.ZMQError:
            pass  # the peer is unreachable: it has nothing left to cancel

    async def _next(self, queue: asyncio.Queue, timeout: float) -> tuple[int, Message]:
        try:
            async with asyncio.timeout(timeout):
                item = await queue.get()
        except TimeoutError:
            raise CallTimeout(f"{self.endpoint}: no reply within {timeout:g} s") from None
        if isinstance(item, Exception):
            raise item
        flag, reply = item
        if isinstance(reply, ErrorReply):
            raise PeerError(reply.code, reply.message, reply.param)
        return flag, reply

    def _on_frames(self, frames: list[bytes]) -> None:
        if len(frames) != 2 or len(frames[0]) != HEADER.size:
            log.warning("%s: dropping malformed reply (%d parts)", self.name, len(frames))
            return
        req_id, flag = HEADER.unpack(frames[0])
        queue = self._pending.get(req_id)
        try:
            reply = None if flag == FLAG_END else self._decoder.decode(frames[1])
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            log.warning("%s: undecodable reply: %s", self.name, e)
            reply = ErrorReply("bad_frame", f"undecodable reply: {e}")
            flag = FLAG_FINAL
        if req_id == 0 and isinstance(reply, ErrorReply):
            log.warning("%s: peer rejected a frame: %s", self.name, reply.message)
        elif queue is not None:
            queue.put_nowait((flag, reply))

    def _on_monitor_event(self, frames: list[bytes]) -> None:
        if parse_monitor_message(frames)["event"] == zmq.EVENT_DISCONNECTED:
            self._fail_all(PeerGone(f"{self.endpoint} disconnected"))

    def _fail_all(self, error: Exception) -> None:
        for queue in self._pending.values():
            queue.put_nowait(error)
