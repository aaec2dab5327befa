"""The gateway's leg timeouts measure silence: a request waiting in a live engine's queue never times out;
an engine that stops answering fails its legs with ``upstream_timeout`` within the timeout.

Real processes (``bench.processes``): a registry, demo-model engines on CPU that run one sequence at a
time (so a second request waits in their queue) — one colocated engine, or a prefill and a decode —
and a gateway whose silence timeouts are far shorter than that wait; the official ``openai`` client.
"""

from __future__ import annotations

import asyncio
import signal
import time

import openai
import pytest
import pytest_asyncio

from bench.processes import Processes, free_port
from tests.procs import eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

SILENCE_S = 1.0  # every leg timeout of the gateway
PROGRESS_S = 0.1  # the engine's progress interval
# the request holding the one slot: ~1.2 ms a token on an idle 2-core host, so ~3.6 s, well past 1.5 x SILENCE_S
# (1,200 tokens took 1.45 s in one run, too short to queue the next request past the timeouts)
LONG_TOKENS = 3000


MODES = {"colocated": "both", "disagg": "decode"}  # each mode's gateway, and the engine streaming its tokens


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack():
    """``(procs, clients)``: one stack with a colocated engine, a prefill and a decode, and one gateway
    per mode (``clients[mode]``)."""
    async with Processes() as procs:
        procs.start_registry()
        engine = ["--max-num-seqs", "1", "--progress-interval-s", str(PROGRESS_S)]
        procs.start_engine("both", "prefill", "--role", "both", *engine)
        procs.start_engine("prefill", "prefill", *engine)
        procs.start_engine("decode", "decode", *engine)
        clients = {}
        for mode in MODES:
            port = free_port()
            # more requests in flight than the engines run: the rest waits in the engines' queues
            procs.spawn(f"gateway-{mode}", "services.gateway", [
                "--port", str(port), "--registry", procs.registry_endpoint, "--mode", mode,
                "--prefill-timeout-s", str(SILENCE_S), "--stream-idle-timeout-s", str(SILENCE_S),
                "--decode-first-token-timeout-s", str(SILENCE_S), "--max-retries", "0",
                "--max-inflight-requests", "8"])  # fmt: skip
            clients[mode] = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                                               max_retries=0, timeout=60)
        await procs.wait_registered(*MODES.values(), "prefill")

        async def ready() -> bool:
            try:
                return all([(await c.models.list()).data for c in clients.values()])
            except openai.APIConnectionError:
                return False

        await eventually(ready, timeout=60, interval=0.1)
        try:
            yield procs, clients
        finally:
            for name in MODES.values():
                procs.procs[name].signal(signal.SIGCONT)
            for c in clients.values():
                await c.close()


async def stream(client: openai.AsyncOpenAI, max_tokens: int, chunks: list[float] | None = None) -> int:
    """A streaming completion of ``max_tokens`` (ignore_eos); returns its completion tokens and notes when
    each chunk came in ``chunks``."""
    response = await client.completions.create(model="demo", prompt="the quick brown fox", max_tokens=max_tokens,
                                               temperature=0, stream=True, stream_options={"include_usage": True},
                                               extra_body={"ignore_eos": True})
    tokens = 0
    async for chunk in response:
        if chunks is not None:
            chunks.append(time.monotonic())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens


@pytest.mark.parametrize("mode", MODES)
async def test_a_request_queued_in_the_engine_far_longer_than_the_timeouts_succeeds(stack, mode):
    client = stack[1][mode]
    long_chunks: list[float] = []
    long = asyncio.create_task(stream(client, LONG_TOKENS, long_chunks))
    # tokens past the first: the long request holds the one decoding slot (in P/D, not still reading its KV)
    await eventually(lambda: len(long_chunks) >= 3, timeout=30)
    queued_at = time.monotonic()
    queued_chunks: list[float] = []
    assert await stream(client, 5, queued_chunks) == 5  # waited for the one sequence slot, never silent
    assert await long == LONG_TOKENS
    # it waited (for its first token, or in P/D for decode after prefill's first) far past the timeouts
    waits = [b - a for a, b in zip([queued_at, *queued_chunks], queued_chunks)]
    assert max(waits) > 1.5 * SILENCE_S, "the test must queue the request past the timeouts"


@pytest.mark.parametrize("mode", MODES)
async def test_an_engine_gone_silent_fails_the_leg_with_upstream_timeout_within_the_timeout(stack, mode):
    procs, client, streamer = stack[0], stack[1][mode], MODES[mode]
    chunks: list[float] = []
    running = asyncio.create_task(stream(client, 2000, chunks))
    await eventually(lambda: chunks, timeout=30)
    procs.procs[streamer].signal(signal.SIGSTOP)  # alive but silent: no tokens, no progress
    stopped = time.monotonic()
    try:
        with pytest.raises(openai.APIError) as failed:
            await running
        elapsed = time.monotonic() - stopped
    finally:
        procs.procs[streamer].signal(signal.SIGCONT)
    assert failed.value.body["code"] == "upstream_timeout"
    assert SILENCE_S - 0.1 < elapsed < SILENCE_S + 2.0
