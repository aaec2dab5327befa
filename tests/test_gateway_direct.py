"""Generation requests served on the gateway's own HTTP protocol (``direct``), without uvicorn's ASGI cycle.

Unit level: uvicorn's real ``HttpToolsProtocol`` machinery parses real request bytes; the same gateway
responses are written once through uvicorn's ASGI cycle and once directly, and the bytes compared; a
handler's exception, the keep-alive timer, a stalled oversized body.
End to end: a real gateway over the real bus to fake engines, through the official ``openai`` client
and raw HTTP on one socket (keep-alive, pipelining, bad JSON, ``Expect: 100-continue``, HTTP/1.0, 404/405,
a client gone before its body ended), and the one timer a request arms.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
import uvicorn
from uvicorn.protocols.http import httptools_impl
from uvicorn.server import ServerState

from bench.fakes import FakeCluster
from services.gateway import direct, sse
from services.gateway.connection_hook import ConnectionHook
from services.gateway.http_protocol import GatewayHTTPProtocol
from services.gateway.responses import JSONResponse, error_response
from services.gateway.errors import APIError
from tests.procs import eventually
from tests.test_gateway_http_protocol import RecordingTransport

PATH = b"/v1/completions"
REQUEST = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"


def protocol_for(app, direct_handler=None, keep_alive_s: float = 5.0) -> tuple[GatewayHTTPProtocol, RecordingTransport]:
    config = uvicorn.Config(app, interface="asgi3", http=GatewayHTTPProtocol, lifespan="off", log_level="critical",
                            proxy_headers=False, server_header=False, access_log=False,
                            timeout_keep_alive=keep_alive_s)
    config.load()
    state = ServerState()
    state.default_headers = [(b"date", b"Mon, 30 Nov 2026 06:00:00 GMT")]
    routes = {PATH: direct_handler} if direct_handler is not None else None
    protocol = GatewayHTTPProtocol(config, state, app_state={}, direct=routes, max_body=1 << 20)
    transport = RecordingTransport()
    protocol.connection_made(transport)
    return protocol, transport


async def served(app, direct_handler=None) -> list[bytes]:
    """The writes of the answer to ``REQUEST``, through uvicorn's cycle (``app``) or directly (``direct_handler``)."""
    protocol, transport = protocol_for(app, direct_handler)
    protocol.data_received(REQUEST)
    await asyncio.gather(*protocol.tasks)
    await asyncio.sleep(0)  # a head held by HeadWithBody leaves at the end of the iteration
    return transport.writes


def stream_response() -> sse.EventStream:
    async def events():
        yield sse.event({"n": 1})
        yield sse.event({"n": 2}) + sse.DONE

    return sse.EventStream(events(), lambda: None, "r2", sse.ClientWatch(None, connection=ConnectionHook()))


@pytest.mark.parametrize("make", [lambda: JSONResponse({"ok": True}, 200, "r1"),
                                  lambda: error_response(APIError(429, "busy", code="queue_full", retry_after=2), "r3"),
                                  stream_response], ids=["json", "error", "stream"])
async def test_a_direct_answer_is_byte_for_byte_what_uvicorns_cycle_writes(make):
    async def handler(request):
        assert await request.read_body() == b"{}"
        return make()

    through_asgi = await served(lambda scope, receive, send: make()(scope, receive, send))
    direct_writes = await served(None, handler)
    assert b"".join(direct_writes) == b"".join(through_asgi)
    assert len(direct_writes) == len(through_asgi)  # the head leaves with the body's first bytes either way
    assert b"date: Mon, 30 Nov 2026" in direct_writes[0]


RealCycle = httptools_impl.RequestResponseCycle


async def test_a_direct_request_does_not_make_uvicorns_cycle(monkeypatch):
    made = []
    monkeypatch.setattr(httptools_impl, "RequestResponseCycle",
                        lambda *a, **k: made.append(1) or RealCycle(*a, **k))

    async def handler(request):
        return JSONResponse({"ok": True})

    await served(None, handler)
    assert made == []
    await served(JSONResponse({"ok": True}))  # the ASGI path still makes one
    assert made == [1]


async def test_a_handler_that_raises_gets_uvicorns_500_and_the_connection_closes():
    async def handler(request):
        raise RuntimeError("boom")

    async def app(scope, receive, send):
        raise RuntimeError("boom")

    protocol, transport = protocol_for(None, handler)
    protocol.data_received(REQUEST)
    await asyncio.gather(*protocol.tasks)
    assert transport.closed
    assert b"".join(transport.writes) == b"".join(await served(app))


async def test_one_keep_alive_timer_per_connection_closing_it_once_idle_never_while_busy():
    release = asyncio.Event()

    async def handler(request):
        if b"slow" in await request.read_body():
            await release.wait()
        return JSONResponse({"ok": True})

    keep_alive_s = 0.2
    protocol, transport = protocol_for(None, handler, keep_alive_s)
    protocol.data_received(REQUEST)
    await eventually(lambda: len(transport.writes) == 1)
    timer = protocol.timeout_keep_alive_task
    assert timer is not None
    protocol.data_received(REQUEST)
    await eventually(lambda: len(transport.writes) == 2)
    assert protocol.timeout_keep_alive_task is timer  # not cancelled and made again per request
    slow = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nslow"
    protocol.data_received(slow)
    busy_since = time.monotonic()
    await eventually(lambda: time.monotonic() - busy_since > 2 * keep_alive_s, timeout=2)
    assert not transport.closed  # the timer fired while a request was being served: the connection stays
    release.set()
    answered = time.monotonic()
    await eventually(lambda: transport.closed, timeout=2)
    assert time.monotonic() - answered >= keep_alive_s * 0.9 and len(transport.writes) == 3


async def test_a_stalled_oversized_body_gets_its_413_and_the_connection_closes(monkeypatch):
    monkeypatch.setattr(direct, "DISCARD_S", 0.1)

    async def handler(request):
        try:
            await request.read_body()
        except APIError as e:
            return error_response(e)
        return JSONResponse({"ok": True})

    protocol, transport = protocol_for(None, handler)
    protocol.data_received(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n" + b"x" * 1000)
    await eventually(lambda: transport.closed, timeout=2)
    head, body = b"".join(transport.writes).split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head
    assert json.loads(body)["error"]["code"] == "request_too_large"


# --------------------------------------------------------------------------- #
# End to end
# --------------------------------------------------------------------------- #


async def roundtrips(url: str, data: bytes, answers: int) -> list[tuple[bytes, bytes]]:
    """(head, body) of ``answers`` answers to the raw ``data`` on one connection (content-length bodies;
    a ``100 Continue`` skipped)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        out = []
        for _ in range(answers):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            if head.startswith(b"HTTP/1.1 100 "):
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            out.append((head, await reader.readexactly(length)))
        return out
    finally:
        writer.close()


def post(body: dict, request_id: str, *extra: bytes, version: bytes = b"1.1") -> bytes:
    data = json.dumps(body).encode()
    return b"".join([b"POST /v1/completions HTTP/%b\r\nHost: x\r\nContent-Type: application/json\r\n" % version,
                     b"X-Request-Id: %b\r\nContent-Length: %d\r\n" % (request_id.encode(), len(data)), *extra,
                     b"\r\n", data])


async def test_end_to_end_openai_client_raw_keep_alive_pipelining_and_the_asgi_fallbacks(monkeypatch):
    made = []
    monkeypatch.setattr(httptools_impl, "RequestResponseCycle", lambda *a, **k: made.append(1) or RealCycle(*a, **k))
    async with FakeCluster(prefill=1, decode=1) as c:
        async with openai.AsyncOpenAI(base_url=c.url + "/v1", api_key="unused", max_retries=0) as client:
            out = await client.completions.create(model="fake", prompt="hi", max_tokens=3, temperature=0)
            assert len(out.choices[0].text) == 3 and out.usage.completion_tokens == 3
            chunks = [ch async for ch in await client.chat.completions.create(
                model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=True)]
            assert chunks[-1].choices[0].finish_reason == "length"
        assert made == []  # neither went through uvicorn's cycle
        good = {"model": "fake", "prompt": "hello", "max_tokens": 2}
        # keep-alive, then two requests pipelined in one write (the second waits for the first, on uvicorn's path)
        answers = await roundtrips(c.url, post(good, "a1") + post(good, "a2") + post({"model": 1}, "a3"), 3)
        assert [h.split(b"\r\n", 1)[0] for h, _ in answers] == [b"HTTP/1.1 200 OK"] * 2 + [b"HTTP/1.1 400 Bad Request"]
        assert [b"x-request-id: a%d" % i in h for i, (h, _) in enumerate(answers, 1)] == [True] * 3
        assert json.loads(answers[2][1])["error"]["type"] == "invalid_request_error"
        bad_json = post(good, "b1").replace(b'{"model"', b'{"model{')  # same length, not JSON
        [(head, body)] = await roundtrips(c.url, bad_json, 1)
        assert head.startswith(b"HTTP/1.1 400") and json.loads(body)["error"]["code"]
        made.clear()
        for extra, version in (((b"Expect: 100-continue\r\n",), b"1.1"), ((), b"1.0")):
            answers = await roundtrips(c.url, post(good, "e1", *extra, version=version), 1)
            assert b"200 OK" in answers[-1][0]
        assert made == [1, 1]  # both on uvicorn's path, answered the same way
        for method, status in ((b"GET", b"405"), (b"PUT", b"405")):
            [(head, body)] = await roundtrips(c.url, b"%b /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n" % method, 1)
            assert head.startswith(b"HTTP/1.1 " + status) and json.loads(body)["error"]["code"] == "method_not_allowed"
        [(head, body)] = await roundtrips(c.url, b"POST /v1/nothing HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 404") and json.loads(body)["error"]["code"] == "not_found"


async def test_a_request_arms_one_timer_for_its_deadline_and_its_legs_silence(monkeypatch):
    """The request deadline, each leg's silence and each wait of a stream share the run's one alarm."""
    loop = asyncio.get_running_loop()
    gateway_timers: list[str] = []
    call_at = loop.call_at

    def recording_call_at(when, callback, *args, **kwargs):
        if getattr(callback, "__module__", "").startswith("services.gateway."):
            gateway_timers.append(callback.__qualname__)
        return call_at(when, callback, *args, **kwargs)

    async with FakeCluster(prefill=1, decode=1) as c:
        async with openai.AsyncOpenAI(base_url=c.url + "/v1", api_key="unused", max_retries=0) as client:
            await client.completions.create(model="fake", prompt="warm", max_tokens=2)
            monkeypatch.setattr(loop, "call_at", recording_call_at)  # asyncio's call_later goes through it
            await client.completions.create(model="fake", prompt="hi", max_tokens=3)
            assert gateway_timers == ["RequestRun._on_alarm"]
            gateway_timers.clear()
            async for _ in await client.completions.create(model="fake", prompt="hi", max_tokens=3, stream=True):
                pass
            assert gateway_timers == ["RequestRun._on_alarm"]


async def test_a_client_gone_before_its_body_ended_is_counted_as_499_without_an_error(caplog):
    async with FakeCluster(prefill=1, decode=1) as c:
        host, port = c.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"model\"")
        await writer.drain()
        writer.close()
        async with httpx.AsyncClient(base_url=c.url) as h:
            async def counted() -> bool:
                text = (await h.get("/metrics")).text
                return 'pdserve_gateway_requests_total{endpoint="/v1/completions",status="499"} 1.0' in text

            await eventually(counted)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
