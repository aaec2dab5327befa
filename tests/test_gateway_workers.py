"""``pdserve gateway --workers N`` (issue 16): N real worker processes serving one port.

The gateway runs as a child process (``python -m services.gateway --workers 2``), the registry
and fake engines in the test's loop; clients are the official ``openai`` client and httpx, each
request on a connection of its own so that the kernel spreads them over the workers.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections import Counter

import httpx
import openai
import pytest

from bench.fakes import FakeCluster
from bench.processes import Processes, free_port
from common.config import ConfigError
from services.up.config import UpConfig
from tests.procs import eventually

WORKERS = 2
CONNECTIONS = 16  # each worker gets at least one of them but with probability 2 ** -15 per round
SAMPLE = re.compile(r'^pdserve_gateway_requests_total\{endpoint="/v1/completions",status="200",worker="(\d+)"\} (\S+)$',
                    re.M)


def worker_pids(parent: int) -> set[int]:
    with open(f"/proc/{parent}/task/{parent}/children") as f:
        return {int(p) for p in f.read().split()}


def listeners(port: int) -> int:
    """How many sockets listen on TCP ``port`` (``/proc/net/tcp``: state 0A)."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return sum(1 for row in rows if row[1].endswith(f":{port:04X}") and row[3] == "0A")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def served(url: str) -> Counter:
    """The 200 completions each worker counted, from /metrics (any worker answers for all)."""
    async with httpx.AsyncClient(timeout=10) as h:
        text = (await h.get(url + "/metrics")).text
    return Counter({worker: int(float(value)) for worker, value in SAMPLE.findall(text)})


async def complete_on_new_connections(url: str, n: int = CONNECTIONS) -> None:
    """``n`` concurrent completions, each from a client of its own (its own connection)."""
    async def one(i: int) -> None:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=10) as client:
            answer = await client.completions.create(model="fake", prompt=f"worker {i}", max_tokens=3)
            assert answer.choices[0].finish_reason == "length"

    await asyncio.gather(*(one(i) for i in range(n)))


@pytest.fixture
async def gateway():
    """(procs, the gateway's base URL) with 2 workers in front of fake prefill + decode engines."""
    cluster = FakeCluster(prefill=0, decode=0, both=0)
    await cluster.start_registry()
    await cluster.add_engine("prefill")
    await cluster.add_engine("decode", token_delay_s=0.05)
    port = free_port()
    try:
        async with Processes() as procs:
            procs.spawn("gateway", "services.gateway", [
                "--registry", cluster.registry_config.bind, "--port", str(port), "--workers", str(WORKERS),
                "--shutdown-timeout-s", "5", "--log-level", "warning"])
            url = f"http://127.0.0.1:{port}"

            def every_worker_listens() -> bool:
                procs.check_alive("gateway")
                return listeners(port) == WORKERS

            await eventually(every_worker_listens, timeout=30)
            yield procs, url
    finally:
        for e in cluster.engines:
            await e.stop()
        await cluster.stop_registry()


@pytest.mark.asyncio
async def test_every_worker_serves_the_port_and_metrics_count_every_request_once(gateway):
    procs, url = gateway
    before = await served(url)
    await complete_on_new_connections(url)
    await complete_on_new_connections(url)
    after = await served(url)
    assert set(after) == {"0", "1"}
    assert all(after[w] > before[w] for w in after), after  # both workers answered
    assert sum(after.values()) - sum(before.values()) == 2 * CONNECTIONS


@pytest.mark.asyncio
async def test_a_killed_worker_is_restarted_and_the_others_keep_serving(gateway):
    procs, url = gateway
    parent = procs.procs["gateway"].popen.pid
    first = worker_pids(parent)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    await eventually(lambda: victim not in worker_pids(parent))
    await complete_on_new_connections(url)  # served by the survivor, or by the restarted worker once it listens
    await eventually(lambda: len(worker_pids(parent) - first) == 1 and listeners(port(url)) == WORKERS, timeout=15)
    before = await served(url)
    await complete_on_new_connections(url)
    after = await served(url)
    assert all(after[w] > before[w] for w in ("0", "1")), (before, after)
    assert sum(after.values()) - sum(before.values()) == CONNECTIONS


def port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@pytest.mark.asyncio
async def test_sigint_drains_every_worker_and_leaves_no_process(gateway):
    procs, url = gateway
    parent = procs.procs["gateway"].popen.pid
    pids = worker_pids(parent)
    streams_started = asyncio.Event()
    started_count = 0

    async def stream(i: int) -> tuple[str | None, int]:
        nonlocal started_count
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=20) as client:
            chunks = await client.completions.create(model="fake", prompt=f"drain {i}", max_tokens=20, stream=True)
            reason, pieces = None, 0
            async for chunk in chunks:
                if pieces == 0:
                    started_count += 1
                    if started_count == CONNECTIONS:
                        streams_started.set()
                pieces += 1
                reason = chunk.choices[0].finish_reason or reason
            return reason, pieces

    streams = [asyncio.create_task(stream(i)) for i in range(CONNECTIONS)]
    await asyncio.wait_for(streams_started.wait(), 10)
    procs.procs["gateway"].signal(signal.SIGINT)  # a terminal's Ctrl-C reaches the parent only
    assert await procs.wait_exit("gateway", timeout_s=15) == 0
    assert [await s for s in streams] == [("length", 20)] * CONNECTIONS  # every stream finished in the drain
    assert not [p for p in pids if alive(p)]
    assert "Traceback" not in procs.procs["gateway"].log_path.read_text()


@pytest.mark.asyncio
async def test_a_second_gateway_on_the_port_of_one_with_workers_is_refused(gateway):
    procs, url = gateway
    second = procs.spawn("second", "services.gateway", ["--registry", "tcp://127.0.0.1:1", "--port", str(port(url)),
                                                        "--workers", "2"])
    assert await procs.wait_exit("second", timeout_s=20) == 2
    assert "--port: cannot listen on" in second.log_path.read_text()
    assert listeners(port(url)) == WORKERS


def test_up_passes_its_gateway_workers_to_the_gateway():
    assert UpConfig(gateway_workers=3).gateway_config("tcp://127.0.0.1:7100").workers == 3
    with pytest.raises(ConfigError, match="^--gateway-workers: must be >= 1$"):
        UpConfig(gateway_workers=0).validate()
