"""``/tokenize`` and ``/detokenize`` (vLLM's shapes) and ``echo`` of token-id prompts, through a real
gateway to a real engine process (demo model on CPU): the gateway has no tokenizer, the engine's
answers, so the counts are exactly what a completion of the same prompt runs."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import pytest_asyncio

from bench.processes import Processes
from services.gateway import GatewayConfig, serve
from tests.procs import eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

TEXT = "Hello there, tokenizer"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def url():
    async with Processes() as procs:
        procs.start_registry()
        procs.start_engine("both", "prefill", "--role", "both")
        await procs.wait_registered("both")
        started = asyncio.get_running_loop().create_future()
        gateway = asyncio.create_task(serve(GatewayConfig(port=0, registry=procs.registry_endpoint,
                                                          log_level="warning"), started=started.set_result))
        try:
            server = await started
            base = f"http://127.0.0.1:{server.port}"
            async with httpx.AsyncClient(base_url=base) as h:
                await eventually(lambda: _ready(h), timeout=30)
            yield base
        finally:
            gateway.cancel()
            await asyncio.gather(gateway, return_exceptions=True)


async def _ready(h: httpx.AsyncClient) -> bool:
    return (await h.get("/ready")).status_code == 200


@pytest_asyncio.fixture(loop_scope="module")
async def http(url):
    async with httpx.AsyncClient(base_url=url, timeout=30) as h:
        yield h


@pytest_asyncio.fixture(loop_scope="module")
async def client(url):
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


async def test_tokenize_a_prompt_counts_what_a_completion_runs(http, client):
    [model] = (await client.models.list()).data
    r = await http.post("/tokenize", json={"model": model.id, "prompt": TEXT, "return_token_strs": True})
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"count", "max_model_len", "tokens", "token_strs"}
    assert out["count"] == len(out["tokens"]) == len(out["token_strs"]) > 0
    assert out["max_model_len"] == model.max_model_len
    completion = await client.completions.create(model=model.id, prompt=TEXT, max_tokens=1)
    assert completion.usage.prompt_tokens == out["count"]
    bare = (await http.post("/tokenize", json={"prompt": TEXT, "add_special_tokens": False})).json()
    assert bare["token_strs"] is None and bare["count"] < out["count"]  # no BOS


async def test_tokenize_chat_messages_counts_what_a_chat_completion_runs(http, client):
    out = (await http.post("/tokenize", json={"messages": CHAT})).json()
    chat = await client.chat.completions.create(model=(await client.models.list()).data[0].id, messages=CHAT,
                                                max_tokens=1)
    assert chat.usage.prompt_tokens == out["count"]
    without = (await http.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": False})).json()
    assert without["count"] < out["count"]


async def test_detokenize_gives_back_the_text(http):
    ids = (await http.post("/tokenize", json={"prompt": TEXT, "add_special_tokens": False})).json()["tokens"]
    r = await http.post("/detokenize", json={"tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": TEXT}


async def test_echo_of_a_token_id_prompt_is_its_text(http, client):
    ids = (await http.post("/tokenize", json={"prompt": TEXT, "add_special_tokens": False})).json()["tokens"]
    model = (await client.models.list()).data[0].id
    out = await client.completions.create(model=model, prompt=ids, max_tokens=2, echo=True)
    assert out.choices[0].text.startswith(TEXT) and out.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("path,body,param", [
    ("/tokenize", {}, "prompt"),
    ("/tokenize", {"prompt": "a", "messages": CHAT}, "prompt"),
    ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/detokenize", {}, "tokens"),
    ("/detokenize", {"tokens": [1 << 30]}, "tokens"),
])
async def test_bad_tokenization_requests_are_400s_naming_the_parameter(http, path, body, param):
    r = await http.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
