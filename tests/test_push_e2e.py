"""Push mode (``--kv-mode push``) end to end with real processes: a registry, two prefills, two decodes and a
colocated baseline, demo model on CPU, all of one model.  ``prefill`` serves shared memory and Mooncake TCP;
``decode`` (32-token blocks: the prefills have 16) takes TCP, ``decode-shm`` shared memory.  Prefills compute
long prompts in chunks of ``CHUNK`` tokens, so each prompt is pushed in several writes.  A gateway in push
mode serves them to the official ``openai`` client.  The tests that kill processes run last.
"""

from __future__ import annotations

import asyncio
import signal

import openai
import pytest
import pytest_asyncio

from bench.engine_driver import EngineDriver, prompt_ids, tokens
from bench.processes import Processes, free_port
from common.errors import PeerError
from common.messages import Abort, Generate, SamplingParams
from tests.procs import eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHUNK = 64
PUSH_TIMEOUT_S = 3.0
ENGINE = ("--kv-mode", "push", "--kv-handshake-timeout-s", "3", "--kv-rpc-timeout-s", "3", "--kv-lease-sweep-interval-s",
          "0.2", "--kv-push-timeout-s", str(PUSH_TIMEOUT_S), "--max-num-batched-tokens", str(CHUNK),
          "--progress-interval-s", "0.2")  # fmt: skip
LENGTHS = [1, 15, 16, 17, 100, 300]


class Stack(EngineDriver):
    def __init__(self, procs: Processes, openai_client: openai.AsyncOpenAI):
        super().__init__(procs.engine_endpoints(), timeout_s=60.0)
        self.procs, self.openai = procs, openai_client


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack():
    async with Processes() as procs:
        procs.start_registry()
        procs.start_engine("prefill", "prefill", *ENGINE, kv_transport="shm,tcp")
        procs.start_engine("prefill-2", "prefill", *ENGINE)
        procs.start_engine("decode", "decode", *ENGINE, "--block-size", "32")
        procs.start_engine("decode-shm", "decode", *ENGINE, kv_transport="auto")
        procs.start_engine("both", "prefill", "--role", "both")
        port = free_port()
        procs.spawn("gateway", "services.gateway", ["--port", str(port), "--registry", procs.registry_endpoint,
                                                    "--mode", "disagg", "--kv-mode", "push", "--prefill-timeout-s",
                                                    "3", "--max-retries", "2"])
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                    timeout=60)
        await procs.wait_registered("prefill", "prefill-2", "decode", "decode-shm", "both")

        async def ready() -> bool:
            try:
                return bool((await client.models.list()).data)
            except openai.APIConnectionError:
                return False

        await eventually(ready, timeout=60, interval=0.1)
        s = Stack(procs, client)
        try:
            yield s
        finally:
            await client.close()
            await s.close()


async def completion_ids(client: openai.AsyncOpenAI, ids: list[int], max_tokens: int = 8) -> list[int]:
    """Greedy completion of the token ids ``ids``, as token ids (``return_token_ids``... via logprobs' tokens)."""
    response = await client.completions.create(model="demo", prompt=ids, max_tokens=max_tokens, temperature=0,
                                               extra_body={"ignore_eos": True, "return_token_ids": True})
    return response.choices[0].model_extra["token_ids"]


@pytest.mark.parametrize(("decode", "transport"), [("decode", "tcp"), ("decode-shm", "shm")])
async def test_push_greedy_output_identical_to_colocated(stack: Stack, decode: str, transport: str):
    """Every length, 16-token prefill blocks into 32-token (tcp) and 16-token (shm) decode blocks."""
    for length in LENGTHS:
        ids = prompt_ids(length, seed=700 + length)
        pre, dec = await stack.push_pd(f"push-{length}-{transport}", ids, decode=decode)
        assert tokens(pre + dec) == await stack.reference(ids), f"prompt of {length} tokens over {transport}"
        assert pre[-1].timings["kv_bytes"] > 0 and dec[0].timings["kv_transfer_s"] > 0
    assert (await stack.stats("prefill")).kv_transports[decode] == transport
    await stack.wait_idle("prefill", decode)
