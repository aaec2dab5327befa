"""Overload is shed at admission: the gateway's bounded queue, 429/503 with Retry-After, disconnects while queued.

Real registry, real gateway, fake engines over the real bus (``bench/fakes/``), the official
``openai`` client; the gateway's state is read the way an operator reads it, from ``/metrics``.
"""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import openai
import pytest

from bench.fakes import FakeCluster
from tests.procs import eventually

MODEL = "fake"
TOKEN_DELAY_S = 0.05  # a fake's gap between two tokens: a 20-token request takes about 1 s


def gateway(**limits) -> dict:
    return {"stream_idle_timeout_s": 5.0, "retry_after_s": 3, **limits}


async def gauge(url: str, name: str) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=5) as h:
        text = (await h.get("/metrics")).text
    return float(re.search(rf"^pdserve_gateway_requests_{name} (\S+)$", text, re.M).group(1))


async def gauge_is(url: str, name: str, value: float) -> bool:
    return await gauge(url, name) == value


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=20)


async def completion(c: openai.AsyncOpenAI, prompt: str, max_tokens: int = 20):
    return await c.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)


async def test_a_full_queue_gets_429_with_retry_after_at_once_while_admitted_requests_all_finish():
    async with FakeCluster(token_delay_s=TOKEN_DELAY_S,
                           gateway=gateway(max_inflight_requests=2, max_queued_requests=2)) as cluster:
        async with client(cluster.url) as c:
            admitted = [asyncio.create_task(completion(c, f"admitted {i}")) for i in range(4)]
            await eventually(lambda: gauge_is(cluster.url, "queued", 2))
            started = time.monotonic()
            with pytest.raises(openai.RateLimitError) as refused:
                await completion(c, "one too many")
            assert time.monotonic() - started < 0.5  # shed at once, not after a wait
            assert refused.value.status_code == 429 and refused.value.response.headers["retry-after"] == "3"
            assert refused.value.body["code"] == "queue_full"
            results = await asyncio.gather(*admitted)
            assert [r.usage.completion_tokens for r in results] == [20] * 4
            assert "one too many" not in {g.prompt for e in cluster.engines for g in e.received}
            await eventually(lambda: gauge_is(cluster.url, "in_flight", 0))


async def test_a_request_queued_past_the_queue_timeout_gets_503_with_retry_after():
    async with FakeCluster(token_delay_s=TOKEN_DELAY_S,
                           gateway=gateway(max_inflight_requests=1, queue_timeout_s=0.3)) as cluster:
        async with client(cluster.url) as c:
            running = asyncio.create_task(completion(c, "long", 40))
            await eventually(lambda: gauge_is(cluster.url, "in_flight", 1))
            started = time.monotonic()
            with pytest.raises(openai.InternalServerError) as refused:
                await completion(c, "waits too long")
            assert 0.3 <= time.monotonic() - started < 1.5
            assert refused.value.status_code == 503 and refused.value.response.headers["retry-after"] == "3"
            assert refused.value.body["code"] == "queue_timeout"
            assert (await running).usage.completion_tokens == 40
            await eventually(lambda: gauge_is(cluster.url, "queued", 0))


async def test_a_client_that_disconnects_while_queued_leaves_the_queue_and_the_gauges_at_zero():
    async with FakeCluster(token_delay_s=TOKEN_DELAY_S, gateway=gateway(max_inflight_requests=1)) as cluster:
        async with client(cluster.url) as c:
            running = asyncio.create_task(completion(c, "long", 40))
            await eventually(lambda: gauge_is(cluster.url, "in_flight", 1))
            queued = asyncio.create_task(c.completions.create(model=MODEL, prompt="gives up", max_tokens=5,
                                                              stream=True))
            await eventually(lambda: gauge_is(cluster.url, "queued", 1))
            queued.cancel()  # the client closes its connection while the request waits for a slot
            await asyncio.gather(queued, return_exceptions=True)
            await eventually(lambda: gauge_is(cluster.url, "queued", 0))
            assert (await running).usage.completion_tokens == 40
            await eventually(lambda: gauge_is(cluster.url, "in_flight", 0))
            assert "gives up" not in {g.prompt for e in cluster.engines for g in e.received}
            after = await completion(c, "the slot came back", 3)  # the slot was not leaked
            assert after.usage.completion_tokens == 3


async def test_shutdown_refuses_queued_requests_with_503_and_lets_the_running_one_finish():
    async with FakeCluster(token_delay_s=TOKEN_DELAY_S, gateway=gateway(max_inflight_requests=1)) as cluster:
        async with client(cluster.url) as c:
            running = asyncio.create_task(completion(c, "long", 40))
            await eventually(lambda: gauge_is(cluster.url, "in_flight", 1))
            queued = asyncio.create_task(completion(c, "queued at shutdown", 5))
            await eventually(lambda: gauge_is(cluster.url, "queued", 1))
            cluster._gateway.cancel()  # what SIGTERM does to the gateway's serve(): drain
            with pytest.raises(openai.InternalServerError) as refused:
                await queued
            assert refused.value.body["code"] == "shutting_down"
            assert (await running).usage.completion_tokens == 40


async def test_by_default_the_gateway_runs_what_the_decoding_engines_can_and_grows_as_one_joins():
    async with FakeCluster(token_delay_s=TOKEN_DELAY_S, max_num_seqs=2, gateway=gateway()) as cluster:
        async with client(cluster.url) as c:
            first = [asyncio.create_task(completion(c, f"first {i}", 40)) for i in range(2)]
            await eventually(lambda: gauge_is(cluster.url, "in_flight", 2))
            third = asyncio.create_task(completion(c, "third", 3))
            await eventually(lambda: gauge_is(cluster.url, "queued", 1))  # one decode engine: 2 at once
            await cluster.add_engine("decode", max_num_seqs=2)
            assert (await third).usage.completion_tokens == 3  # admitted as the second decode joined
            assert not any(t.done() for t in first), "the third must not have waited for the first two"
            assert [r.usage.completion_tokens for r in await asyncio.gather(*first)] == [40, 40]
