"""The gateway says why an instance failed: one warning per failure episode, naming the instance and the error.

A real gateway process, a real registry, and an instance registered at an endpoint nobody listens on
(what an engine advertising a host it does not bind looks like from the gateway).
"""

from __future__ import annotations

import asyncio
import sys

import openai
import pytest

from bench.fakes import FakeCluster, fingerprint
from bench.processes import free_port
from common.messages import Capacity, Instance, Load
from common.registry_client import RegistryClient
from tests.procs import eventually

pytestmark = pytest.mark.asyncio


async def test_unreachable_instance_is_logged_once_with_its_error():
    port, dead = free_port(), free_port()
    async with FakeCluster(prefill=0, decode=0) as c:
        registry = RegistryClient(c.registry_config.bind)
        unreachable = Instance(id="both-unreachable", role="both", request_endpoint=f"tcp://127.0.0.1:{dead}",
                               kv_endpoint=f"tcp://127.0.0.1:{dead}", model="demo", fingerprint=fingerprint("demo", 16),
                               capacity=Capacity(max_num_seqs=8, num_kv_blocks=100, max_model_len=512))
        await registry.start_heartbeats(unreachable, lambda: Load(kv_blocks_total=100))
        gateway = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.gateway", "--port", str(port), "--registry", c.registry_config.bind,
            "--mode", "colocated", "--prefill-timeout-s", "0.5", "--max-retries", "0", stderr=asyncio.subprocess.PIPE)
        try:
            client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)

            async def ready() -> bool:
                try:
                    return bool((await client.models.list()).data)
                except openai.APIConnectionError:
                    return False

            await eventually(ready, timeout=30, interval=0.1)
            for _ in range(3):
                with pytest.raises(openai.APIStatusError) as failed:
                    await client.completions.create(model="demo", prompt="hello", max_tokens=2)
                assert failed.value.status_code in (503, 504)
            await client.close()
        finally:
            gateway.terminate()
            _, err = await gateway.communicate()
            await registry.close()
    warnings = [line for line in err.decode().splitlines() if "both-unreachable failed" in line]
    assert len(warnings) == 1, err.decode()  # once per episode, not per request
    assert "WARNING" in warnings[0] and "no reply within 0.5 s" in warnings[0]
    assert f"tcp://127.0.0.1:{dead} reachable" in warnings[0]
