"""Hypothesis-generated JSON bodies for the generation endpoints of a real gateway (fake engines over the real
bus): every answer is a 2xx (a stream read to its ``[DONE]``) or a 4xx with an OpenAI error body, never a 5xx,
and no request stays counted in flight afterwards.

Derandomized, so CI runs the same examples every time within a few seconds; raise ``max_examples`` (or
drop ``derandomize``) locally to search further.
"""

from __future__ import annotations

import json

import httpx
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fakes import FakeCluster
from tests.procs import eventually
from tests.test_gateway_api import samples

pytestmark = pytest.mark.asyncio(loop_scope="module")

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


def deepened(body: dict, kind: str, depth: int) -> bytes:
    """The JSON of ``body`` with one more field nesting arrays or objects ``depth`` levels deep."""
    deep = b"[" * depth + b"]" * depth if kind == "array" else b'{"a":' * depth + b"1" + b"}" * depth
    return json.dumps(body).encode()[:-1] + b', "deep": ' + deep + b"}"


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


async def test_no_fuzzed_request_stays_in_flight(http):
    async def idle() -> bool:
        return samples((await http.get("/metrics")).text)[("pdserve_gateway_requests_in_flight", ())] == 0

    await eventually(idle)
