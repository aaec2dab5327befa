"""The gateway's HTTP protocol (issue 16): a response's head leaves in the same write as its body, and a
request hears that its connection closed through the connection's hook.

uvicorn's real ``HttpToolsProtocol`` parses real request bytes and runs the gateway's own ASGI
responses; the transport under it records each write (one write is one send system call, and one
TCP segment with ``TCP_NODELAY``).
"""

from __future__ import annotations

import asyncio

import uvicorn
from uvicorn.server import ServerState

from services.gateway import sse
from services.gateway.connection_hook import connection_hook
from services.gateway.http_protocol import GatewayHTTPProtocol
from services.gateway.responses import JSONResponse

REQUEST = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"


class RecordingTransport(asyncio.Transport):
    """A connection's socket end: what is written, one entry per write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default=None):
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)


async def serve_one(app, transport: RecordingTransport | None = None) -> RecordingTransport:
    """``REQUEST`` through the gateway's protocol to ``app``; the transport once the response is complete."""
    transport = transport or RecordingTransport()
    config = uvicorn.Config(app, interface="asgi3", http=GatewayHTTPProtocol, lifespan="off", log_level="warning",
                            proxy_headers=False, server_header=False, date_header=False)
    config.load()
    protocol = GatewayHTTPProtocol(config, ServerState(), app_state={})
    protocol.connection_made(transport)
    protocol.data_received(REQUEST)
    await asyncio.gather(*protocol.tasks)
    await asyncio.sleep(0)  # the end of the iteration: a head still held would leave now
    return transport


async def test_a_json_answer_is_one_write():
    transport = await serve_one(JSONResponse({"ok": True}, 200, "r1"))
    assert len(transport.writes) == 1, transport.writes
    head, body = transport.writes[0].split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK") and b"x-request-id: r1" in head
    assert body == b'{"ok":true}'


async def test_a_stream_head_leaves_with_its_first_event():
    async def events():
        yield sse.event({"n": 1})
        yield sse.event({"n": 2}) + sse.DONE

    async def app(scope, receive, send):
        await sse.EventStream(events(), lambda: None, "r2", sse.ClientWatch(receive))(scope, receive, send)

    transport = await serve_one(app)
    assert len(transport.writes) == 2, transport.writes  # head + first event, then the rest and the end
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK")
    assert transport.writes[0].endswith(b'data: {"n":1}\n\n\r\n')
    assert transport.writes[1].endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")


async def test_a_head_without_its_body_leaves_at_the_end_of_the_iteration():
    heads_seen: list[int] = []
    transport = RecordingTransport()

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await asyncio.sleep(0)  # the loop iteration of the head ends here
        heads_seen.append(len(transport.writes))
        await send({"type": "http.response.body", "body": b"ok"})

    await serve_one(app, transport)
    assert heads_seen == [1]  # the head went out alone before the body was sent
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK") and transport.writes[1] == b"ok"


async def test_a_request_hears_its_connection_close_without_a_pending_receive():
    transport = RecordingTransport()
    outcome: list[str] = []
    waiting = asyncio.Event()

    async def app(scope, receive, send):
        await receive()  # the body
        connection = connection_hook(scope)
        assert connection is not None and connection.on_lost is None
        forever = asyncio.get_running_loop().create_future()
        waiting.set()
        try:
            await sse.run_until_disconnect(receive, forever, connection=connection)
        except sse.ClientGone:
            outcome.append("gone")
        assert connection.on_lost is None  # nothing left that refers to this request

    config = uvicorn.Config(app, interface="asgi3", http=GatewayHTTPProtocol, lifespan="off", log_level="warning")
    config.load()
    protocol = GatewayHTTPProtocol(config, ServerState(), app_state={})
    protocol.connection_made(transport)
    protocol.data_received(REQUEST)
    await waiting.wait()
    assert not protocol.cycle.message_event._waiters  # no receive() pending while the request waits
    protocol.connection_lost(None)
    await asyncio.gather(*protocol.tasks)
    assert outcome == ["gone"]
