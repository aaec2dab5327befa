"""Hostile and broken requests against a real gateway (fake engines over the real bus): deeply nested
JSON, oversized bodies, and the in-flight gauge returning to 0 on every way a request can end."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import pytest_asyncio

from bench.fakes import FakeCluster
from tests.procs import eventually
from tests.test_gateway_api import samples

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "fake"
MIB = 1 << 20


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster():
    async with FakeCluster(prefill=1, decode=1, max_model_len=512) as c:
        yield c


@pytest_asyncio.fixture(loop_scope="module")
async def http(cluster):
    async with httpx.AsyncClient(base_url=cluster.url, timeout=20) as h:
        yield h


@pytest_asyncio.fixture(loop_scope="module")
async def client(cluster):
    async with openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def nested(depth: int, kind: str) -> bytes:
    """A JSON value ``depth`` levels deep: arrays (``[[[...]]]``) or objects (``{"a":{"a":...}}``)."""
    if kind == "array":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


async def in_flight(h: httpx.AsyncClient) -> float:
    return samples((await h.get("/metrics")).text)[("pdserve_gateway_requests_in_flight", ())]


def assert_openai_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]
    return error


@pytest.mark.parametrize("depth", [1_000, 100_000])
@pytest.mark.parametrize("kind", ["array", "object"])
@pytest.mark.parametrize("path, field", [("/v1/completions", "prompt"), ("/v1/completions", "unknown"),
                                         ("/v1/chat/completions", "messages"), ("/v1/chat/completions", "unknown"),
                                         ("/tokenize", "prompt")])
async def test_deeply_nested_json_is_a_400_naming_the_nesting(http, path, field, kind, depth):
    """A value the decoder walks into (an unknown field, a prompt's list) is refused once past its recursion
    limit (``invalid_json``); a field whose type cannot hold that value is refused at once (``invalid_type``)."""
    body = b'{"model":"fake","' + field.encode() + b'":' + nested(depth, kind) + b"}"
    r = await http.post(path, content=body)
    code = r.json()["error"]["code"] if r.status_code == 400 else None
    assert code == "invalid_json" if field == "unknown" else code in ("invalid_json", "invalid_type")
    error = assert_openai_error(r, 400, code)
    assert code == "invalid_type" or "nests arrays or objects too deeply" in error["message"]


async def test_an_oversized_body_gets_its_413_even_when_the_client_closes_after_the_answer(http):
    """A client sending ``Connection: close`` (as many do) gets the 413, not a reset: the gateway reads the
    rest of the body before answering, so the connection never closes under a client still sending."""
    body = b'{"model":"fake","prompt":"' + b"z" * (2 * MIB) + b'"}'

    async def chunked():
        for i in range(0, len(body), 65536):
            yield body[i:i + 65536]

    for content in (body, chunked()):
        r = await http.post("/v1/completions", content=content, headers={"Connection": "close",
                                                                         "Content-Type": "application/json"})
        assert_openai_error(r, 413, "request_too_large")
    r = await http.post("/tokenize", content=body, headers={"Connection": "close"})
    assert_openai_error(r, 413, "request_too_large")


async def test_the_in_flight_gauge_returns_to_zero_on_every_way_a_request_ends(http, client, cluster):
    decode = cluster.of("decode")[0]
    prefill = cluster.of("prefill")[0]
    ok = {"model": MODEL, "prompt": "gauge", "max_tokens": 4}

    # rejected at admission: bad JSON, nesting, validation, unknown model, oversized, duplicate id
    await http.post("/v1/completions", content=b'{"model":')
    await http.post("/v1/completions", content=b'{"model":"fake","prompt":' + nested(5_000, "array") + b"}")
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model=MODEL, prompt="x", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="nope", prompt="x", stream=True)
    await http.post("/v1/completions", json={**ok, "prompt": "z" * (2 * MIB)})

    # engine errors before the first token, streaming and not
    prefill.faults.fail_code = "overloaded"
    try:
        with pytest.raises(openai.APIStatusError):
            await client.completions.create(model=MODEL, prompt="x", max_tokens=3)
        with pytest.raises(openai.APIStatusError):
            await client.completions.create(model=MODEL, prompt="x", max_tokens=3, stream=True)
    finally:
        prefill.faults.fail_code = None

    # a stalled decode: clients that go away mid-stream and before the JSON answer; a duplicate id meanwhile
    decode.faults.stall_after = 1
    try:
        async with http.stream("POST", "/v1/completions", json={**ok, "stream": True},
                               headers={"X-Request-Id": "gauge-dup"}) as r:
            assert r.status_code == 200
            duplicate = await http.post("/v1/completions", json=ok, headers={"X-Request-Id": "gauge-dup"})
            assert duplicate.json()["error"]["code"] == "duplicate_request_id"
            assert await in_flight(http) == 1
        waiting = asyncio.create_task(http.post("/v1/completions", json=ok))
        await eventually(lambda: _in_flight_is(http, 1))
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
    finally:
        decode.faults.stall_after = None

    # an error mid-stream: decode refusing after prefill streamed the first token
    decode.faults.fail_code = "overloaded"
    try:
        stream = await client.completions.create(model=MODEL, prompt="x", max_tokens=3, stream=True)
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
    finally:
        decode.faults.fail_code = None

    await eventually(lambda: _in_flight_is(http, 0))
    assert (await client.completions.create(model=MODEL, prompt="after", max_tokens=2)).choices[0].text


async def _in_flight_is(h: httpx.AsyncClient, value: int) -> bool:
    return await in_flight(h) == value
