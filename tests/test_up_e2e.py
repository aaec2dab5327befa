"""``pdserve up`` as real processes, driven through the official ``openai`` client and raw HTTP.

One stack (registry, 2 prefill, 1 decode, gateway; the demo model, Mooncake
over TCP on loopback) serves every test of this module.  The fault tests come
last and kill processes that ``pdserve up`` restarts.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from bench.processes import free_port

ROOT = Path(__file__).parents[1]
IDLE_TIMEOUT_S = 3.0
pytestmark = pytest.mark.timeout(600)


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


class Stack:
    def __init__(self, tmp: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp / "up.log", "wb")
        engine_args = ("--num-kv-blocks 1024 --dtype float32 --device cpu "
                       "--kv-lease-seconds 10 --shutdown-timeout-s 5")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "up", "--prefill", "2", "--decode", "1",
             "--port", str(self.port),
             "--engine-args", engine_args,
             "--gateway-args", f"--stream-idle-timeout-s {IDLE_TIMEOUT_S} --failure-cooldown-s 1",
             "--shutdown-timeout-s", "10", "--log-level", "warning"],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"pdserve up exited with {self.proc.returncode}")
        try:
            return httpx.get(self.url + "/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def instances(self) -> list[dict]:
        return httpx.get(self.url + "/v1/instances", timeout=5).json()["data"]

    def pid_of(self, pattern: str) -> int:
        """The pid of the child of ``pdserve up`` whose command line has ``pattern``."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid), "-f", "--", pattern], capture_output=True, text=True)
        (pid,) = out.stdout.split()
        return int(pid)

    def engine_pid(self, role: str) -> int:
        inst = next(i for i in self.instances() if i["role"] == role)
        return self.pid_of(f"--instance-id {inst['id']} ")

    def gauges(self, name: str) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        return {m.group(1): float(m.group(2))
                for m in re.finditer(rf'^pdserve_instance_{name}\{{instance="([^"]+)".*?\}} (\S+)$', text, re.M)}

    def idle(self) -> bool:
        used, pinned = self.gauges("kv_blocks_used"), self.gauges("kv_blocks_pinned")
        return len(used) == 3 and not any(used.values()) and not any(pinned.values())

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        finally:
            self.log.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("up"))
    try:
        wait_for(s.ready, 180, "pdserve up to be ready")
        wait_for(lambda: len(s.instances()) == 3, 30, "three instances")
        yield s
    finally:
        children = subprocess.run(["pgrep", "-P", str(s.proc.pid)], capture_output=True, text=True).stdout.split()
        s.stop()
        assert s.proc.returncode == 0
        for pid in children:  # no orphan outlives pdserve up
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


@pytest.fixture
def client(stack):
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", timeout=60, max_retries=0)


GREEDY = dict(model="demo", temperature=0, extra_body={"ignore_eos": True})


# --------------------------------------------------------------------------- #
# The API through the official client
# --------------------------------------------------------------------------- #


def test_completion_usage_and_determinism(client):
    a = client.completions.create(prompt="The quick brown fox", max_tokens=12, **GREEDY)
    b = client.completions.create(prompt="The quick brown fox", max_tokens=12, **GREEDY)
    assert a.choices[0].finish_reason == "length"
    assert a.usage.completion_tokens == 12
    assert a.usage.prompt_tokens > 4 and a.usage.total_tokens == a.usage.prompt_tokens + 12
    assert a.choices[0].text == b.choices[0].text  # greedy through P/D is deterministic
    # the second identical prompt hit prefill's prefix cache: its usage says so
    assert b.usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_streaming_with_usage(client):
    stream = client.chat.completions.create(
        messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=10, stream=True,
        stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    full = client.chat.completions.create(messages=[{"role": "user", "content": "Tell me a story"}],
                                          max_tokens=10, **GREEDY)
    assert full.choices[0].message.content == content


def test_n_choices_each_complete(client):
    r = client.completions.create(prompt="Once upon a time", max_tokens=6, n=2, seed=7, temperature=1.0,
                                  model="demo", extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == 12


def test_seed_reproducible(client):
    kw = dict(prompt="Random words:", max_tokens=10, temperature=1.0, top_p=0.9, model="demo",
              extra_body={"ignore_eos": True})
    a = client.completions.create(seed=1234, **kw).choices[0].text
    b = client.completions.create(seed=1234, **kw).choices[0].text
    assert a == b


def test_stop_string_trims_output(client):
    base = client.completions.create(prompt="Stop test", max_tokens=40, **GREEDY).choices[0].text
    visible = [i for i, ch in enumerate(base) if ch.isprintable() and ch != "\ufffd" and i >= 3]
    assert visible, "greedy text has no printable character to stop at"
    stop = base[visible[0]]
    r = client.completions.create(prompt="Stop test", max_tokens=40, stop=[stop], **GREEDY)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[: base.index(stop)]


def test_logprobs_first_token_from_prefill(client):
    r = client.completions.create(prompt="Logprobs", max_tokens=4, logprobs=2, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and all(x <= 0 for x in lp.token_logprobs)
    assert all(len(t) >= 1 for t in lp.top_logprobs)
    assert not any(t.startswith("token_id:") for t in lp.tokens)  # engines send each token's text
    # greedy: the chosen token is the most likely one, for the prefill token as for decode's
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)


def test_metrics_split_the_handoff(stack, client):
    client.completions.create(prompt="metrics " * 40, max_tokens=3, **GREEDY)
    text = httpx.get(stack.url + "/metrics", timeout=5).text

    def count(name: str) -> float:
        return float(re.search(rf"^pdserve_gateway_{name}_count (\S+)$", text, re.M).group(1))

    for name in ("ttft_seconds", "prefill_leg_seconds", "prefill_queue_seconds", "prefill_seconds",
                 "decode_dispatch_seconds", "decode_first_output_seconds", "kv_transfer_seconds",
                 "first_decode_step_seconds", "first_itl_seconds"):
        assert count(name) >= 1, name
    assert float(re.search(r"^pdserve_gateway_kv_transfer_bytes_sum (\S+)$", text, re.M).group(1)) > 0


def test_pdserve_bench_against_the_stack(stack, tmp_path):
    """A short real ``pdserve bench`` run: valid JSON with the measured statistics, and a PNG."""
    from common.engine.demo_model import ensure_demo_checkpoint

    out, plot = tmp_path / "bench.json", tmp_path / "latency.png"
    run = subprocess.run(
        [sys.executable, "-m", "services.cli", "bench", "--url", stack.url, "--model", "demo",
         "--tokenizer", str(ensure_demo_checkpoint()), "--num-prompts", "6", "--input-len", "40",
         "--output-len", "8", "--request-rate", "20", "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000",
         "--out", str(out), "--plot", str(plot), "--progress", "false"],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    doc = json.loads(out.read_text())
    (result,) = doc["runs"]
    summary = result["summary"]
    assert summary["completed"] == 6 and summary["failed"] == 0 and not summary["errors"]
    assert summary["slo_attainment"] == 1.0 and summary["goodput"] > 0
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        stats = summary[metric]
        assert 0 <= stats["p50"] <= stats["p99"] <= stats["max"] and stats["mean"] > 0, metric
    # exact prompt lengths through the demo tokenizer; the server's count adds the BOS token
    assert all(r["output_tokens"] == 8 and r["prompt_tokens"] == 41 for r in result["requests"])
    png = plot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


# --------------------------------------------------------------------------- #
# Raw HTTP
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (json.dumps({"model": "demo"}).encode(), "prompt"),
    (json.dumps({"model": "demo", "prompt": "x", "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"model": "demo", "prompt": "x", "max_tokens": 100000}).encode(), "max_tokens"),
    (json.dumps({"model": "demo", "prompt": "x", "temperature": -1}).encode(), "temperature"),
    (json.dumps({"model": "demo", "prompt": "x", "n": 0}).encode(), "n"),
    (json.dumps({"model": "demo", "prompt": "x", "stop": 5}).encode(), "stop"),
    (json.dumps({"model": "demo", "prompt": "0123456789" * 1000}).encode(), "prompt"),
])
def test_bad_input_is_an_openai_400(stack, body, param):
    r = httpx.post(stack.url + "/v1/completions", content=body, headers={"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param


def test_unknown_model_is_a_404(stack):
    r = httpx.post(stack.url + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model", r.text


def test_sse_framing_and_request_id(stack):
    body = {"model": "demo", "prompt": "SSE", "max_tokens": 5, "stream": True, "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", stack.url + "/v1/completions", json=body, headers={"X-Request-Id": "req-e2e-42"},
                      timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-request-id"] == "req-e2e-42"
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all(p["object"] == "text_completion" for p in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"


# --------------------------------------------------------------------------- #
# Faults (last: they kill processes that pdserve up restarts)
# --------------------------------------------------------------------------- #


def test_client_disconnect_leaves_nothing_pinned(stack):
    body = {"model": "demo", "prompt": "a long story " * 20, "max_tokens": 2000, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", stack.url + "/v1/completions", json=body, timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 6:
                break  # leave mid-stream
    wait_for(stack.idle, 5 + 2, "used and pinned blocks back to 0 on every instance")


async def _many(url: str, n: int) -> list[str]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", timeout=120, max_retries=0)
    rs = await asyncio.gather(*(client.completions.create(prompt=f"request {i} " * 8, max_tokens=24, **GREEDY)
                                for i in range(n)))
    await client.close()
    return [r.choices[0].finish_reason for r in rs]


def test_prefill_killed_with_requests_in_flight(stack):
    pid = stack.engine_pid("prefill")

    async def run() -> list[str]:
        task = asyncio.create_task(_many(stack.url, 20))
        await asyncio.sleep(0.3)
        os.kill(pid, signal.SIGKILL)
        return await task

    assert asyncio.run(run()) == ["length"] * 20
    wait_for(lambda: len(stack.instances()) == 3, 60, "the restarted prefill to register")
    wait_for(stack.idle, 15, "idle blocks after the prefill kill")


def test_registry_restart_keeps_serving(stack, client):
    pid = stack.pid_of("services.cli registry ")
    os.kill(pid, signal.SIGKILL)
    r = client.completions.create(prompt="while the registry is down", max_tokens=4, **GREEDY)
    assert r.choices[0].finish_reason == "length"
    wait_for(lambda: len(stack.instances()) == 3, 30, "membership to recover after the registry restart")
    r = client.completions.create(prompt="after the registry restart", max_tokens=4, **GREEDY)
    assert r.choices[0].finish_reason == "length"


def test_decode_killed_mid_stream_ends_with_an_error_event(stack):
    body = {"model": "demo", "prompt": "kill the decode", "max_tokens": 3000, "stream": True, "ignore_eos": True}
    wait_for(lambda: len(stack.instances()) == 3, 30, "three instances")
    pid = stack.engine_pid("decode")
    events: list[str] = []
    with httpx.stream("POST", stack.url + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(line)
            if len(events) == 5:
                break
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        for line in lines:
            if line.startswith("data: "):
                events.append(line)
        ended = time.monotonic()
    assert ended - killed < IDLE_TIMEOUT_S + 3
    errors = [json.loads(e[6:]) for e in events if e != "data: [DONE]" and "error" in json.loads(e[6:])]
    assert errors and errors[-1]["error"]["message"]
    wait_for(lambda: len(stack.instances()) == 3, 60, "the restarted decode to register")
    wait_for(stack.idle, 15, "idle blocks after the decode kill")
