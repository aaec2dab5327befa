"""``pdserve up --mode colocated`` with and without ``--kv-offload-cpu-gib``, through the official ``openai``
client: a prompt whose blocks other prompts evicted from the (12-block) KV cache comes back from host
memory (cached tokens, same output) with offload, and is recomputed without."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from bench.processes import free_port
from tests.test_up_e2e import wait_for

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.timeout(300)
GREEDY = dict(model="demo", temperature=0, max_tokens=5, extra_body={"ignore_eos": True})


@pytest.fixture(params=[0.0, 0.01], ids=["no-offload", "offload"])
def served(request, tmp_path):
    """(base URL, offload GiB) of a running ``pdserve up`` colocated stack."""
    port = free_port()
    engine_args = f"--num-kv-blocks 12 --dtype float32 --device cpu --kv-offload-cpu-gib {request.param}"
    with open(tmp_path / "up.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "up", "--mode", "colocated", "--port", str(port),
             "--engine-args", engine_args, "--shutdown-timeout-s", "10", "--log-level", "warning"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"pdserve up exited with {proc.returncode}: {(tmp_path / 'up.log').read_text()}")
        try:
            return httpx.get(url + "/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, 180, "pdserve up to be ready")
        yield url, request.param
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_an_evicted_prompt_is_served_from_host_memory_with_offload(served):
    url, gib = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60, max_retries=0)
    rng = random.Random(5)
    prompt = [rng.randrange(300) for _ in range(64)]
    first = client.completions.create(prompt=prompt, **GREEDY)
    for _ in range(3):  # 100 tokens each: together they take every block of the 12-block cache
        client.completions.create(prompt=[rng.randrange(300) for _ in range(100)], **GREEDY)
    again = client.completions.create(prompt=prompt, **GREEDY)
    assert again.choices[0].text == first.choices[0].text
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == (48 if gib else 0)  # 3 blocks of 16 tokens
