"""The gateway's HTTP API: the official ``openai`` client and raw HTTP, against fake engines.

One cluster (real registry, real gateway, fake prefill/decode engines over the
real bus) serves the whole module; tests that need another setup start their own.
"""

from __future__ import annotations

import json
from importlib.metadata import version

import httpx
import openai
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from bench.fakes import FakeCluster, token_at
from common.messages import SamplingParams
from services.gateway.openai_protocol import parse_chat, parse_completion
from tests.procs import eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "fake"


def expected_text(prompt: str, n: int, *, seed: int | None = None, temperature: float = 0.0) -> str:
    ids = list(prompt.encode())
    sampling = SamplingParams(max_tokens=n, temperature=temperature, seed=seed)
    return "".join(chr(token_at(ids, sampling, i)) for i in range(n))


def chat_prompt(content: str) -> str:
    return f"user: {content}\nassistant:"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster():
    async with FakeCluster(prefill=1, decode=1, max_model_len=512) as c:
        yield c


@pytest_asyncio.fixture(loop_scope="module")
async def client(cluster):
    async with openai.AsyncOpenAI(base_url=cluster.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest_asyncio.fixture(loop_scope="module")
async def http(cluster):
    async with httpx.AsyncClient(base_url=cluster.url, timeout=10) as h:
        yield h


# --------------------------------------------------------------------------- #
# Through the official client
# --------------------------------------------------------------------------- #


async def test_completion_matches_the_engines_output_across_the_split(client, cluster):
    out = await client.completions.create(model=MODEL, prompt="hello world", max_tokens=7, temperature=0)
    assert isinstance(out, Completion)
    assert out.choices[0].text == expected_text("hello world", 7)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len("hello world")
    assert out.usage.completion_tokens == 7
    assert out.usage.total_tokens == len("hello world") + 7
    prefill, decode = cluster.of("prefill")[0], cluster.of("decode")[0]
    rid = out.id.removeprefix("cmpl-")
    assert [g.do_remote_decode for g in prefill.received if g.request_id == rid] == [True]
    [d] = [g for g in decode.received if g.request_id == rid]
    assert d.remote_prefill is not None and d.prompt_token_ids == list(b"hello world")


async def test_chat_streaming_equals_non_streaming_and_reports_usage(client):
    messages = [{"role": "user", "content": "tell me"}]
    full = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=9, temperature=0)
    assert isinstance(full, ChatCompletion)
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].message.content == expected_text(chat_prompt("tell me"), 9)

    stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=9, temperature=0,
                                                  stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 9
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens == len(chat_prompt("tell me"))


async def test_chat_stream_opens_each_choice_with_a_role_only_chunk(client):
    """As OpenAI and vLLM do: the role comes alone, so every later chunk of the choice is output."""
    stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "r"}], n=2,
                                                  max_tokens=3, temperature=0, stream=True, logprobs=True)
    by_index: dict[int, list] = {0: [], 1: []}
    async for c in stream:
        [choice] = c.choices
        by_index[choice.index].append(choice)
    for choices in by_index.values():
        opening, *pieces = choices
        assert opening.delta.role == "assistant" and opening.delta.content == ""
        assert opening.logprobs is None and opening.finish_reason is None
        assert pieces and all(p.delta.role is None for p in pieces)
        assert sum(len(p.logprobs.content) for p in pieces) == 3
        assert "".join(p.delta.content for p in pieces) == expected_text(chat_prompt("r"), 3)


async def test_completion_streaming_without_usage_has_no_usage_chunk(client):
    stream = await client.completions.create(model=MODEL, prompt="abc", max_tokens=4, temperature=0, stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks) == expected_text("abc", 4)
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks)


async def test_n2_runs_a_pair_per_choice_with_distinct_seeds(client, cluster):
    out = await client.completions.create(model=MODEL, prompt="pair", max_tokens=6, n=2, seed=11, temperature=1.0)
    assert sorted(c.index for c in out.choices) == [0, 1]
    texts = {c.index: c.text for c in out.choices}
    assert texts[0] == expected_text("pair", 6, seed=11, temperature=1.0)
    assert texts[1] == expected_text("pair", 6, seed=12, temperature=1.0)
    assert texts[0] != texts[1]
    assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens == 4
    rid = out.id.removeprefix("cmpl-")
    decoded = {g.request_id for g in cluster.of("decode")[0].received}
    assert {f"{rid}-0", f"{rid}-1"} <= decoded

    stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=2,
                                                  max_tokens=5, seed=3, temperature=1.0, stream=True)
    by_index: dict[int, str] = {0: "", 1: ""}
    async for c in stream:
        for choice in c.choices:
            by_index[choice.index] += choice.delta.content or ""
    assert by_index[0] == expected_text(chat_prompt("x"), 5, seed=3, temperature=1.0)
    assert by_index[1] == expected_text(chat_prompt("x"), 5, seed=4, temperature=1.0)


async def test_seed_makes_sampling_repeatable(client):
    a = await client.completions.create(model=MODEL, prompt="seeded", max_tokens=8, seed=5, temperature=0.9)
    b = await client.completions.create(model=MODEL, prompt="seeded", max_tokens=8, seed=5, temperature=0.9)
    c = await client.completions.create(model=MODEL, prompt="seeded", max_tokens=8, seed=6, temperature=0.9)
    assert a.choices[0].text == b.choices[0].text != c.choices[0].text


async def test_stop_string_ends_the_output_before_it(client):
    full = expected_text("stopper", 12)
    stop = full[5:7]
    cut = full.index(stop)
    out = await client.completions.create(model=MODEL, prompt="stopper", max_tokens=12, temperature=0, stop=[stop])
    assert out.choices[0].text == full[:cut]
    assert out.choices[0].finish_reason == "stop"
    stream = await client.completions.create(model=MODEL, prompt="stopper", max_tokens=12, temperature=0,
                                             stop=stop, stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks) == full[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_first_token_ending_the_request_skips_decode_and_frees_prefill(client, cluster):
    decode = cluster.of("decode")[0]
    before = len(decode.received)
    out = await client.completions.create(model=MODEL, prompt="one", max_tokens=1, temperature=0)
    assert out.choices[0].text == expected_text("one", 1) and out.choices[0].finish_reason == "length"
    first = expected_text("solo", 1)
    out = await client.completions.create(model=MODEL, prompt="solo", max_tokens=5, temperature=0, stop=[first])
    assert out.choices[0].text == "" and out.choices[0].finish_reason == "stop"
    assert len(decode.received) == before
    assert cluster.of("prefill")[0].load().kv_blocks_pinned == 0


async def test_logprobs_first_token_from_prefill(client):
    out = await client.completions.create(model=MODEL, prompt="lp", max_tokens=4, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert lp.tokens == list(expected_text("lp", 4))
    assert lp.token_logprobs == [-0.25, -0.5, -0.75, -1.0]
    assert lp.text_offset == [0, 1, 2, 3]
    assert all(len(t) == 2 and lp.tokens[i] in t for i, t in enumerate(lp.top_logprobs))

    chat = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "lp"}],
                                                max_tokens=3, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert [c.token for c in content] == list(chat.choices[0].message.content)
    assert [c.logprob for c in content] == [-0.25, -0.5, -0.75]
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token for c in content)
    assert content[0].bytes == list(content[0].token.encode())


async def test_cached_tokens_come_from_prefill_not_decode(client):
    prompt = "0123456789"  # 10 tokens: 2 full blocks of 4
    await client.completions.create(model=MODEL, prompt=prompt, max_tokens=3)
    again = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=3)
    # the fake decode reports the whole prompt (10) as its cached tokens: it must not leak through
    assert again.usage.prompt_tokens_details.cached_tokens == 8


async def test_max_completion_tokens_is_honoured(client):
    out = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "m"}],
                                               max_completion_tokens=3, max_tokens=50, temperature=0)
    assert out.usage.completion_tokens == 3 and len(out.choices[0].message.content) == 3


async def test_models_instances_health_ready_openapi(client, http, cluster):
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].max_model_len == 512  # as vLLM lists it
    assert (await http.get("/version")).json() == {"version": version("pdserve")}
    inst = (await http.get("/v1/instances")).json()["data"]
    assert sorted(i["role"] for i in inst) == ["decode", "prefill"]
    assert all("load" in i and i["load"]["kv_blocks_total"] == 4096 for i in inst)
    assert (await http.get("/health")).status_code == 200
    assert (await http.get("/ready")).json() == {"status": "ready"}
    spec = (await http.get("/openapi.json")).json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize",
            "/version"} <= set(spec["paths"])
    assert "CompletionRequest" in spec["components"]["schemas"]
    assert {"429", "503"} <= set(spec["paths"]["/v1/chat/completions"]["post"]["responses"])  # admission control
    r = await http.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await http.get("/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a /metrics page: (name, sorted labels) -> value."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_metrics_count_tokens_and_finish_reasons_and_show_kv_usage(client, http, cluster):
    """What vLLM users graph: prompt and generation tokens, finished requests by reason, running and
    waiting requests and the KV usage ratio per instance."""
    before = samples((await http.get("/metrics")).text)
    await client.completions.create(model=MODEL, prompt="tokens", max_tokens=3, n=2)
    stopped = await client.completions.create(model=MODEL, prompt="stop", max_tokens=50, temperature=0,
                                              stop=[expected_text("stop", 50)[2]])
    assert stopped.choices[0].finish_reason == "stop"
    after = samples((await http.get("/metrics")).text)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert delta("pdserve_gateway_prompt_tokens_total") == 2 * len("tokens") + len("stop")
    assert delta("pdserve_gateway_generation_tokens_total") == 2 * 3 + stopped.usage.completion_tokens
    assert delta("pdserve_gateway_request_success_total", finished_reason="length") == 2
    assert delta("pdserve_gateway_request_success_total", finished_reason="stop") == 1

    async def instances_idle() -> bool:
        """The gauges come from heartbeats, and a prefill frees its blocks when the decode has read them:
        both can trail the responses by a heartbeat."""
        now = samples((await http.get("/metrics")).text)
        return all(now[(gauge, (("instance", e.id), ("role", e.role)))] == 0.0 for e in cluster.engines
                   for gauge in ("pdserve_instance_kv_usage_ratio", "pdserve_instance_running",
                                 "pdserve_instance_waiting"))

    await eventually(instances_idle, timeout=10)


async def test_kv_usage_ratio_follows_the_heartbeats():
    """A stream in flight holds KV blocks: the ratio rises above 0 while it runs, and falls back after."""
    async with FakeCluster(prefill=0, decode=0, both=1, num_blocks=128, token_delay_s=0.02,
                           gateway={"mode": "colocated"}) as c:
        labels = (("instance", c.of("both")[0].id), ("role", "both"))
        async with httpx.AsyncClient(base_url=c.url, timeout=30) as h:
            body = {"model": MODEL, "prompt": "kv" * 40, "max_tokens": 200, "stream": True}
            async with h.stream("POST", "/v1/completions", json=body) as r:
                await eventually(lambda: _ratio(h, labels, lambda v: v > 0), timeout=10)
            await eventually(lambda: _ratio(h, labels, lambda v: v == 0), timeout=10)
            assert r.status_code == 200


async def _ratio(h: httpx.AsyncClient, labels: tuple, check) -> bool:
    value = samples((await h.get("/metrics")).text).get(("pdserve_instance_kv_usage_ratio", labels))
    return value is not None and check(value)


async def test_metrics_expose_request_counters_histograms_and_instance_gauges(client, http, cluster):
    await client.completions.create(model=MODEL, prompt="metrics", max_tokens=3)
    text = (await http.get("/metrics")).text
    assert 'pdserve_gateway_requests_total{endpoint="/v1/completions",status="200"}' in text
    for name in ("ttft_seconds", "tpot_seconds", "e2e_seconds", "prefill_seconds", "kv_transfer_seconds",
                 "kv_transfer_bytes"):
        assert f"pdserve_gateway_{name}_count" in text
    prefill = cluster.of("prefill")[0]
    assert f'pdserve_instance_kv_blocks_total{{instance="{prefill.id}",role="prefill"}} 4096.0' in text


# --------------------------------------------------------------------------- #
# Raw HTTP: framing, headers, every bad input
# --------------------------------------------------------------------------- #


async def test_sse_framing_content_type_and_done(http):
    body = {"model": MODEL, "prompt": "frame", "max_tokens": 4, "stream": True}
    async with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join([chunk async for chunk in r.aiter_raw()])
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    for e in events[:-2]:
        assert e.startswith(b"data: {") and b"\n" not in e
        json.loads(e[6:])
    assert len(events) == 4 + 2


async def test_x_request_id_is_echoed_but_engines_see_a_random_handle(http, cluster):
    r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "rid", "max_tokens": 3},
                        headers={"X-Request-Id": "my-req.42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "my-req.42"
    assert r.json()["id"] == "cmpl-my-req.42"
    for role in ("prefill", "decode"):
        handle = cluster.of(role)[0].received[-1].request_id
        assert handle != "my-req.42" and len(handle) == 32 and int(handle, 16) >= 0
    r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "rid", "max_tokens": 3},
                        headers={"X-Request-Id": "bad id with spaces"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Id"
    r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "rid", "max_tokens": 3})
    assert len(r.headers["x-request-id"]) == 32


BAD = [
    # (path, body, param, code)
    ("/v1/completions", b"{not json", None, "invalid_json"),
    ("/v1/completions", b"[1, 2]", None, "invalid_type"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "5"}, "max_tokens", "invalid_type"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": "yes"}, "stream", "invalid_type"),
    ("/v1/completions", {"model": 7, "prompt": "x"}, "model", "invalid_type"),
    ("/v1/completions", {"model": MODEL}, "prompt", "missing_required_parameter"),
    ("/v1/completions", {"prompt": "x"}, "model", "missing_required_parameter"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, "prompt", "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, -2]}, "prompt", "invalid_type"),
    ("/v1/completions", {"model": MODEL, "prompt": {"a": 1}}, "prompt", "invalid_type"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens", "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -3}, "max_tokens", "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 100000}, "max_tokens", "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "y" * 600, "max_tokens": 5}, "prompt", "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "y" * 500, "max_tokens": 100}, "max_tokens", "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -0.1}, "temperature", "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, "top_p", "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 0}, "n", "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 1000}, "n", "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": 5}, "stop", "invalid_type"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ["a", 3]}, "stop[1]", "invalid_type"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": [""]}, "stop", "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ["s"] * 17}, "stop", "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 99}, "logprobs", "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "seed": 1 << 70}, "seed", "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "echo": True, "logprobs": 1}, "echo",
     "unsupported_parameter"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "presence_penalty": 0.5}, "presence_penalty",
     "unsupported_parameter"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty",
     "unsupported_parameter"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "repetition_penalty": 1.2}, "repetition_penalty",
     "unsupported_parameter"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "min_p": 0.1}, "min_p", "unsupported_parameter"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "min_tokens": 4}, "min_tokens", "unsupported_parameter"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"5": 1.0}}, "logit_bias",
     "unsupported_parameter"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "guided_json": {"type": "object"}}, "guided_json", "unsupported_parameter"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "guided_choice": ["a", "b"]}, "guided_choice",
     "unsupported_parameter"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "response_format": {"type": "json_object"}},
     "response_format", "unsupported_parameter"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema", "json_schema": {"name": "s"}}},
     "response_format", "unsupported_parameter"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "repetition_penalty": 0.9}, "repetition_penalty", "unsupported_parameter"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": 1}},
     "stream_options.include_usage", "invalid_type"),
    ("/v1/chat/completions", {"model": MODEL}, "messages", "missing_required_parameter"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages", "invalid_value"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"content": "x"}]}, "messages[0].role",
     "missing_required_parameter"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
     "messages[0].role", "invalid_value"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, "messages[0].content",
     "missing_required_parameter"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, "messages", "invalid_type"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 0}, "max_completion_tokens", "invalid_value"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 2}, "top_logprobs", "invalid_value"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 600}]},
     "messages", "invalid_value"),
]


@pytest.mark.parametrize("path,body,param,code", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
async def test_bad_input_is_a_400_with_the_openai_error_body(http, path, body, param, code):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = await http.post(path, headers={"Content-Type": "application/json"}, **kwargs)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]
    assert (err["param"], err["code"]) == (param, code)


async def test_unknown_model_is_a_404_as_vllm_answers(client, http):
    with pytest.raises(openai.NotFoundError) as e:
        await client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert (e.value.body["param"], e.value.body["code"]) == ("model", "model_not_found")
    assert "fake" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    r = await http.post("/tokenize", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_echo_starts_each_choice_with_the_prompt(client):
    out = await client.completions.create(model=MODEL, prompt=["ab", "cd"], max_tokens=3, n=2, temperature=0,
                                          echo=True)
    assert [c.text for c in out.choices] == ["ab" + expected_text("ab", 3)] * 2 + ["cd" + expected_text("cd", 3)] * 2
    assert out.usage.completion_tokens == 4 * 3
    stream = await client.completions.create(model=MODEL, prompt="ef", max_tokens=3, temperature=0, echo=True,
                                             stream=True)
    chunks = [c.choices[0].text async for c in stream]
    assert chunks[0] == "ef" + expected_text("ef", 3)[0] and "".join(chunks) == "ef" + expected_text("ef", 3)


async def test_chat_echo_repeats_a_final_assistant_message_as_vllm_does(client):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Sure, "}]
    prompt = "user: q\nassistant: Sure, \nassistant:"
    out = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0,
                                               extra_body={"echo": True})
    assert out.choices[0].message.content == "Sure, " + expected_text(prompt, 2)
    stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0,
                                                  stream=True, extra_body={"echo": True})
    pieces = [c.choices[0].delta.content async for c in stream]
    assert pieces[0] == "" and pieces[1].startswith("Sure, ") and "".join(pieces) == out.choices[0].message.content
    out = await client.chat.completions.create(model=MODEL, messages=messages[:1], max_tokens=2, temperature=0,
                                               extra_body={"echo": True})
    assert out.choices[0].message.content == expected_text(chat_prompt("q"), 2)  # the last message is the user's


async def test_bad_input_through_the_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        await client.completions.create(model=MODEL, prompt="x", temperature=-1)
    assert e.value.body["param"] == "temperature"


async def test_oversized_body_is_413(http):
    body = {"model": MODEL, "prompt": "z" * (1 << 20)}
    r = await http.post("/v1/completions", json=body)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    async def chunked():  # no Content-Length: the limit applies while reading
        yield b'{"model": "fake", "prompt": "'
        for _ in range(20):
            yield b"z" * 65536
        yield b'"}'

    r = await http.post("/v1/completions", content=chunked(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


async def test_parsers_build_engine_sampling():
    req = parse_completion(b'{"model":"m","prompt":[[1,2],[3]],"n":2,"seed":-1,"stop":"x","top_k":-1,'
                           b'"temperature":0.5,"top_p":0.9,"logprobs":1}', default_max_tokens=16, max_n=4)
    assert [p.token_ids for p in req.prompts] == [[1, 2], [3]]
    s = req.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.stop, s.logprobs) == (16, 0.5, 0.9, 0, ["x"], 1)
    assert s.seed == (1 << 63) - 1 and req.choice_sampling(1).seed == 0
    chat = parse_chat(b'{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},'
                      b'{"type":"text","text":"b"}]}],"logprobs":true}', default_max_tokens=7, max_n=4)
    assert chat.prompts[0].messages[0].content == "ab"
    assert (chat.sampling.max_tokens, chat.sampling.logprobs, chat.max_tokens_given) == (7, 0, False)


async def test_api_key_guards_v1_routes():
    async with FakeCluster(prefill=1, decode=1, gateway={"api_key": "sekret"}) as c:
        async with httpx.AsyncClient(base_url=c.url) as h:
            body = {"model": MODEL, "prompt": "k", "max_tokens": 2}
            r = await h.post("/v1/completions", json=body)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            r = await h.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
            assert r.status_code == 401
            assert (await h.get("/v1/models")).status_code == 401
            assert (await h.post("/tokenize", json={"prompt": "k"})).status_code == 401
            assert (await h.post("/detokenize", json={"tokens": [1]})).status_code == 401
            r = await h.get("/metrics")
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert (await h.get("/metrics", headers={"Authorization": "Bearer sekret"})).status_code == 200
            for path in ("/version", "/openapi.json"):  # everything but the probes needs the key
                assert (await h.get(path)).status_code == 401
                assert (await h.get(path, headers={"Authorization": "Bearer sekret"})).status_code == 200
            assert (await h.get("/health")).status_code == 200
            assert (await h.get("/ready")).status_code == 200
        async with openai.AsyncOpenAI(base_url=c.url + "/v1", api_key="sekret", max_retries=0) as client:
            out = await client.completions.create(model=MODEL, prompt="k", max_tokens=2)
            assert out.usage.completion_tokens == 2


async def test_metrics_public_serves_metrics_without_the_key():
    async with FakeCluster(prefill=1, decode=1, gateway={"api_key": "sekret", "metrics_public": True}) as c:
        async with httpx.AsyncClient(base_url=c.url) as h:
            assert (await h.get("/metrics")).status_code == 200
            assert (await h.get("/v1/models")).status_code == 401


async def test_colocated_mode_serves_from_both_instances_with_the_same_output():
    async with FakeCluster(prefill=0, decode=0, both=1, gateway={"mode": "colocated"}) as c:
        both = c.of("both")[0]
        async with openai.AsyncOpenAI(base_url=c.url + "/v1", api_key="x", max_retries=0) as client:
            out = await client.completions.create(model=MODEL, prompt="hello world", max_tokens=7, temperature=0)
            assert out.choices[0].text == expected_text("hello world", 7)
            assert out.usage.completion_tokens == 7
            stream = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "c"}],
                                                          max_tokens=4, temperature=0, stream=True)
            text = "".join([ch.choices[0].delta.content or "" async for ch in stream])
            assert text == expected_text(chat_prompt("c"), 4)
        assert all(not g.do_remote_decode and g.remote_prefill is None for g in both.received)
        assert both.load().kv_blocks_used == 0
