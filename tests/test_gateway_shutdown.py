"""Ctrl-C of a real gateway process with streams in flight (defect 7 of issue 14).

The gateway runs as a child process (``python -m services.gateway``), the registry and a
slow fake colocated engine in the test's loop.  On SIGINT a stream that can finish within
``--shutdown-timeout-s`` finishes; one that cannot gets a final error event and ``[DONE]``
(a JSON request: the 503), and a request whose body arrives after the signal is refused with
the same 503; the process exits 0 with no traceback in its log.
"""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
import pytest

from bench.fakes import FakeCluster
from bench.processes import Processes, free_port
from tests.procs import eventually

pytestmark = pytest.mark.asyncio

DRAIN_S = 2.0
TOKEN_DELAY_S = 0.05  # a short stream (10 tokens) ends inside the drain, a long one (400) does not


async def read_stream(h: httpx.AsyncClient, max_tokens: int, started: asyncio.Event) -> list[dict | str]:
    """The data of every SSE event of one streamed completion (``"[DONE]"`` as a string)."""
    body = {"model": "fake", "prompt": "shutdown", "max_tokens": max_tokens, "stream": True}
    events: list[dict | str] = []
    async with h.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
                started.set()
    return events


async def refused(port: int) -> bool:
    """A new connection to ``port`` is refused (or, connected just as the listener closed, dropped unanswered)."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as fresh:
        try:
            await fresh.get("/health")
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
            return True
    return False


async def test_sigint_finishes_or_ends_streams_with_an_error_event_and_a_clean_log():
    cluster = FakeCluster(prefill=0, decode=0, both=0)
    await cluster.start_registry()
    await cluster.add_engine("both", token_delay_s=TOKEN_DELAY_S)
    port = free_port()
    try:
        async with Processes() as procs:
            gateway = procs.spawn("gateway", "services.gateway", [
                "--registry", cluster.registry_config.bind, "--port", str(port), "--mode", "colocated",
                "--shutdown-timeout-s", str(DRAIN_S)])
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as h:
                async def ready() -> bool:
                    procs.check_alive("gateway")
                    try:
                        return (await h.get("/ready")).status_code == 200
                    except httpx.TransportError:
                        return False

                await eventually(ready, timeout=60)
                long_started, short_started = asyncio.Event(), asyncio.Event()
                long = asyncio.create_task(read_stream(h, 400, long_started))
                await long_started.wait()
                short = asyncio.create_task(read_stream(h, 10, short_started))
                await short_started.wait()
                whole = asyncio.create_task(h.post("/v1/completions", json={"model": "fake", "prompt": "json",
                                                                             "max_tokens": 400}))
                signalled = asyncio.Event()

                async def body_sent_after_the_signal():
                    yield b'{"model": "fake", '
                    await signalled.wait()
                    yield b'"prompt": "late", "max_tokens": 2}'

                late = asyncio.create_task(h.post("/v1/completions", content=body_sent_after_the_signal(),
                                                  headers={"Content-Type": "application/json"}))
                await eventually(lambda: cluster.engines[0].load().running == 3)
                gateway.signal(signal.SIGINT)
                await eventually(lambda: refused(port), timeout=10)  # listening stopped: draining
                signalled.set()
                short_events, long_events, whole_answer = await short, await long, await whole
                late_answer = await late
                status = await procs.wait_exit("gateway", timeout_s=DRAIN_S + 10)
            log = gateway.log_path.read_text()
    finally:
        for e in cluster.engines:
            await e.stop()
        await cluster.stop_registry()

    assert short_events[-1] == "[DONE]"
    assert short_events[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["text"] for e in short_events[:-1]) and len(short_events) == 11
    assert long_events[-1] == "[DONE]"
    error = long_events[-2]["error"]
    assert error["code"] == "shutting_down" and error["type"] == "service_unavailable_error"
    assert all("choices" in e for e in long_events[:-2])
    assert whole_answer.status_code == 503 and whole_answer.json()["error"]["code"] == "shutting_down"
    assert late_answer.status_code == 503 and late_answer.json()["error"]["code"] == "shutting_down"
    assert status == 0, log
    assert "Traceback" not in log and "CancelledError" not in log, log
