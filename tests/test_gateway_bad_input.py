"""Hostile and broken requests against a real gateway (fake engines over the real bus): deeply nested
JSON, oversized bodies, hypothesis-generated bodies, and the in-flight gauge returning to 0 on every way
a request can end.

The fuzz tests send JSON bodies of the generation endpoints: every answer is a 2xx (a stream read to its
``[DONE]``) or a 4xx with an OpenAI error body, never a 5xx.  They are derandomized, so CI runs the same
examples every time within a few seconds; raise ``max_examples`` (or drop ``derandomize``) locally to
search further.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fakes import FakeCluster
from tests.procs import eventually
from tests.test_gateway_api import samples

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "fake"
MIB = 1 << 20

FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=16)


def field(plausible: st.SearchStrategy) -> st.SearchStrategy:
    """A field's value: mostly one a client would send, sometimes any JSON at all."""
    return st.one_of(plausible, plausible, json_values)


small_ints = st.integers(-3, 40)
token_ids = st.lists(st.integers(-2, 300), max_size=6)
texts = st.text(max_size=16)
common = {
    "max_tokens": field(small_ints), "n": field(st.integers(-1, 4)), "stream": field(st.booleans()),
    "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "temperature": field(st.floats(-1, 3)), "top_p": field(st.floats(-0.5, 1.5)), "top_k": field(small_ints),
    "stop": field(texts | st.lists(texts, max_size=3)), "seed": field(st.integers()),
    "echo": field(st.booleans()), "ignore_eos": field(st.booleans()), "user": field(texts),
    "presence_penalty": field(st.floats(-2, 2)), "response_format": field(st.just({"type": "text"})),
    "unknown_field": json_values,
}
completion = st.fixed_dictionaries({"model": field(st.just("fake"))}, optional={
    **common, "prompt": field(texts | token_ids | st.lists(texts | token_ids, max_size=3)),
    "logprobs": field(st.integers(-1, 6)), "best_of": field(st.integers(0, 3)), "suffix": field(texts),
}).filter(lambda b: b.get("echo") is not True or isinstance(b.get("prompt"), str))  # the fakes cannot detokenize
part = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"])}, optional={"text": texts})
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"])},
                                optional={"content": field(texts | st.lists(part, max_size=3))})
chat = st.fixed_dictionaries({"model": field(st.just("fake"))}, optional={
    **common, "messages": field(st.lists(message, max_size=3)), "logprobs": field(st.booleans()),
    "top_logprobs": field(st.integers(-1, 6)), "max_completion_tokens": field(small_ints),
    "tools": field(st.lists(st.dictionaries(texts, texts, max_size=2), max_size=2)),
})


def nested(depth: int, kind: str) -> bytes:
    """A JSON value ``depth`` levels deep: arrays (``[[[...]]]``) or objects (``{"a":{"a":...}}``)."""
    if kind == "array":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


def deepened(body: dict, kind: str, depth: int) -> bytes:
    """The JSON of ``body`` with one more field nesting arrays or objects ``depth`` levels deep."""
    return json.dumps(body).encode()[:-1] + b', "deep": ' + nested(depth, kind) + b"}"


def encoded(bodies: st.SearchStrategy) -> st.SearchStrategy:
    """A body as bytes: the JSON of ``bodies`` (NaN and Infinity included), sometimes with a deeply nested
    field, or arbitrary bytes."""
    plain = bodies.map(lambda b: json.dumps(b).encode())
    deep = st.builds(deepened, bodies, st.sampled_from(["array", "object"]), st.integers(1, 100_000))
    return st.one_of(plain, plain, plain, deep, st.binary(max_size=48))



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


async def in_flight(h: httpx.AsyncClient) -> float:
    return samples((await h.get("/metrics")).text)[("pdserve_gateway_requests_in_flight", ())]


def assert_openai_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]
    return error


@pytest.mark.parametrize("depth", [1_000, 100_000])
@pytest.mark.parametrize("kind", ["array", "object"])
@pytest.mark.parametrize("path, name", [("/v1/completions", "prompt"), ("/v1/completions", "unknown"),
                                         ("/v1/chat/completions", "messages"), ("/v1/chat/completions", "unknown"),
                                         ("/tokenize", "prompt")])
async def test_deeply_nested_json_is_a_400_naming_the_nesting(http, path, name, kind, depth):
    """A value the decoder walks into (an unknown field, a prompt's list) is refused once past its recursion
    limit (``invalid_json``); a field whose type cannot hold that value is refused at once (``invalid_type``)."""
    body = b'{"model":"fake","' + name.encode() + b'":' + nested(depth, kind) + b"}"
    r = await http.post(path, content=body)
    code = r.json()["error"]["code"] if r.status_code == 400 else None
    assert code == "invalid_json" if name == "unknown" else code in ("invalid_json", "invalid_type")
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


async def answer(h: httpx.AsyncClient, path: str, body: bytes) -> None:
    """POST ``body``; assert it is answered with a 2xx or an OpenAI-shaped 4xx, a stream read to its end."""
    async with h.stream("POST", path, content=body, headers={"Content-Type": "application/json"}) as r:
        raw = await r.aread()
    assert r.status_code < 500, (r.status_code, raw[:300])
    if r.status_code >= 400:
        error = json.loads(raw)["error"]
        assert isinstance(error["message"], str) and error["message"] and error["type"] and "code" in error
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [line.removeprefix(b"data: ") for line in raw.split(b"\n\n") if line]
        assert events[-1] == b"[DONE]"
        assert all(isinstance(json.loads(e), dict) for e in events[:-1])
    else:
        assert json.loads(raw)["choices"]


@FUZZ
@given(body=encoded(completion))
async def test_completions_answer_every_body_with_a_2xx_or_an_openai_4xx(http, body):
    await answer(http, "/v1/completions", body)


@FUZZ
@given(body=encoded(chat))
async def test_chat_completions_answer_every_body_with_a_2xx_or_an_openai_4xx(http, body):
    await answer(http, "/v1/chat/completions", body)


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

    # a stalled decode: clients that go away mid-stream and before the JSON answer
    decode.faults.stall_after = 1
    try:
        async with http.stream("POST", "/v1/completions", json={**ok, "stream": True}) as r:
            assert r.status_code == 200
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
