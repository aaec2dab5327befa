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
the ``FLAG_FINAL`` record that ends the stream (``Outbox.retag_last``).  Errors
travel as ``ErrorReply`` in a ``FLAG_FINAL`` record and are raised by the client
as ``PeerError``.

Records for one peer queued during one event-loop iteration leave together as
one ZMQ message at the start of the next iteration (``Outbox``), or as soon as
``MAX_BATCH_RECORDS`` are queued: each ZMQ message costs a wake-up of libzmq's
I/O thread on both ends, far more than the records themselves, so under load
many requests share one, and a stream item followed at once by its end costs
one.  The cap keeps a pipeline of processes working in parallel: with unbounded
batches a loaded gateway hands a whole iteration's requests to an engine at once
and then idles until they all come back, so the processes take turns in
lock-step convoys instead of overlapping.  Records of one request keep their order.

A flooding peer cannot stall the loop: one ``Reader`` drain takes a bounded
number of frames and then yields (the handlers it started, timers and other
sockets such as the registry's heartbeats run first), what it left waits in
libzmq's bounded queues, and the server refuses a message of more than
``MAX_BATCH_RECORDS`` records.  Endpoints are checked before a client's socket
exists (``endpoints``).

Nothing here blocks on a slow, dead or restarted peer: the server sends with
NOBLOCK and ROUTER_MANDATORY (a vanished or stuck peer's running handlers are
cancelled), the client fails pending calls with ``PeerGone`` when its
connection drops or its send queue is full, and every wait has a finite timeout.

With the process's CURVE keys every socket is encrypted and a server admits
only the roles it names (``curve``, ``zap``); a handler may ask who sent its
message (``common.bus.server.sender()``).

Modules: ``records`` (header layout, flags, limits, body encoding), ``sockets``
(socket options and non-blocking sends), ``endpoints`` (what a client may
dial), ``curve`` (keys, and CURVE on each socket), ``zap`` (which clients a
server admits), ``reader`` (incoming messages), ``outbox`` (per-iteration
batching), ``server`` (``BusServer``), ``client`` (``BusClient``).
"""

from common.bus.client import BusClient
from common.bus.records import (
    DEFAULT_MAX_FRAME_BYTES,
    FLAG_END,
    FLAG_FINAL,
    FLAG_ITEM,
    HEADER,
    KIND_CANCEL,
    KIND_REQUEST,
    MAX_BATCH_RECORDS,
    encode,
)
from common.bus.server import BusServer, Handler

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "FLAG_END",
    "FLAG_FINAL",
    "FLAG_ITEM",
    "HEADER",
    "KIND_CANCEL",
    "KIND_REQUEST",
    "MAX_BATCH_RECORDS",
    "BusClient",
    "BusServer",
    "Handler",
    "encode",
]
