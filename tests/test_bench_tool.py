"""``pdserve bench`` end to end against a small OpenAI-compatible SSE server run in this process."""

import asyncio
import contextlib
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bench.datasets import EXACT, DatasetError, jsonl_dataset, random_dataset
from bench.serving import arrival_offsets, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).parents[1]


@dataclass
class FakeServer:
    """Streams ``max_tokens`` tokens (at most ``max_output``), ``tokens_per_chunk`` per chunk, each token
    with text ``token_text``, after fixed delays.

    The n-th request (1-based, in arrival order) gets a 500 when ``n % fail_every == 0``,
    a stream cut before ``[DONE]`` when ``n % truncate_every == 0``, and a stall
    longer than any client timeout when ``n % stall_every == 0``.  A model not in
    ``models`` gets a 404; usage counts ``tokens_per_word`` prompt tokens per word.
    """

    first_delay_s: float = 0.05
    gap_s: float = 0.01
    tokens_per_chunk: int = 2
    token_text: str = "tok "
    max_output: int | None = None
    usage: bool = True
    fail_every: int = 0
    truncate_every: int = 0
    stall_every: int = 0
    models: list[dict] = field(default_factory=lambda: [{"id": "tiny-test", "object": "model"}])
    tokens_per_word: int = 1
    bodies: list[dict] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/models", self.list_models),
            Route("/v1/completions", self.generate, methods=["POST"]),
            Route("/v1/chat/completions", self.generate, methods=["POST"]),
        ])

    async def list_models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": self.models})

    def _is(self, every: int, n: int) -> bool:
        return every > 0 and n % every == 0

    async def generate(self, request: Request):
        body = await request.json()
        self.bodies.append(body)
        n = len(self.bodies)
        if self._is(self.fail_every, n):
            return JSONResponse({"error": {"message": "injected failure"}}, status_code=500)
        if body["model"] not in {m["id"] for m in self.models}:
            return JSONResponse({"error": {"message": f"The model `{body['model']}` does not exist.",
                                           "type": "NotFoundError", "param": "model", "code": 404}}, status_code=404)
        chat = "messages" in body
        prompt = " ".join(m["content"] for m in body["messages"]) if chat else body["prompt"]
        return StreamingResponse(self.events(n, chat, len(prompt.split()) * self.tokens_per_word, body["max_tokens"]),
                                 media_type="text/event-stream")

    async def events(self, n: int, chat: bool, prompt_tokens: int, max_tokens: int):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if chat:
                yield self.sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
            await asyncio.sleep(self.first_delay_s)
            if self.max_output is not None:
                max_tokens = min(max_tokens, self.max_output)
            sent = 0
            while sent < max_tokens:
                k = min(self.tokens_per_chunk, max_tokens - sent)
                text = self.token_text * k
                choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
                yield self.sse({"choices": [choice]})
                sent += k
                if sent < max_tokens:
                    if self._is(self.truncate_every, n):
                        return
                    if self._is(self.stall_every, n):
                        await asyncio.sleep(30)
                    await asyncio.sleep(self.gap_s)
            if self.usage:
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": max_tokens,
                         "total_tokens": prompt_tokens + max_tokens}
                yield self.sse({"choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
        finally:
            self.in_flight -= 1

    @staticmethod
    def sse(obj: dict) -> str:
        return f"data: {json.dumps(obj)}\n\n"


@contextlib.contextmanager
def serve(fake: FakeServer):
    """Run ``fake`` with uvicorn on 127.0.0.1 in a thread; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(fake.app(), log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "test server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def bench(url: str, tmp_path, *extra: str, status: int = 0) -> dict:
    """``pdserve bench`` with ``extra`` flags, which must exit with ``status``; its results document."""
    out = tmp_path / "results.json"
    rc = main(["--url", url, "--out", str(out), "--progress", "false", *extra])
    assert rc == status
    return json.loads(out.read_text())


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000


def test_single_run_measures_the_server(tmp_path, capsys):
    fake = FakeServer(first_delay_s=0.05, gap_s=0.01, tokens_per_chunk=2)
    plot = tmp_path / "latency.png"
    with serve(fake) as url:
        doc = bench(url, tmp_path, "--num-prompts", "12", "--input-len", "20", "--output-len", "6",
                    "--max-concurrency", "4", "--slo-ttft-ms", "10000", "--plot", str(plot))
    assert doc["model"] == "tiny-test"  # from GET /v1/models
    assert doc["dataset"]["length_method"] == "approx-words"
    assert doc["config"]["request_rate"] == "inf"
    (run,) = doc["runs"]
    s = run["summary"]
    assert (s["completed"], s["failed"], s["errors"]) == (12, 0, {})
    assert s["ttft_ms"]["min"] >= 50  # the server's first-token delay
    assert s["itl_ms"]["count"] == 12 * 2  # 3 chunks per request -> 2 gaps
    # client-side gaps can shrink under load, but the last chunk cannot arrive before the server sent it
    for r in run["requests"]:
        assert r["ttft_s"] + sum(r["itl_s"]) >= 0.05 + 2 * 0.01
    assert s["e2e_ms"]["min"] >= 50 + 2 * 10
    assert 0 < s["tpot_ms"]["mean"] <= s["e2e_ms"]["max"] / 5
    assert s["total_output_tokens"] == 12 * 6  # from usage, not the 3 chunks
    assert s["total_input_tokens"] == 12 * 20  # the server's word count equals the approx-words length
    assert s["good_requests"] == 12 and s["slo_attainment"] == 1.0
    assert s["goodput"] == pytest.approx(s["request_throughput"])
    assert s["output_throughput"] == pytest.approx(72 / s["duration_s"])
    assert fake.max_in_flight <= 4
    body = fake.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["max_tokens"] == 6 and body["model"] == "tiny-test"
    req = run["requests"][0]
    assert req["output_tokens_source"] == "usage" and req["error"] is None
    assert req["tpot_s"] == pytest.approx((req["e2e_s"] - req["ttft_s"]) / 5)
    assert_png(plot)
    table = capsys.readouterr().out
    assert "Successful requests" in table and "p99 TPOT (ms)" in table


def test_sweep_runs_every_rate_with_the_same_prompts(tmp_path, capsys):
    fake = FakeServer(first_delay_s=0.01, gap_s=0.005)
    plot = tmp_path / "sweep.png"
    with serve(fake) as url:
        doc = bench(url, tmp_path, "--model", "tiny-test", "--num-prompts", "6", "--input-len", "8",
                    "--output-len", "4", "--sweep-rate", "40,inf", "--slo-tpot-ms", "1000", "--plot", str(plot))
    assert [run["request_rate"] for run in doc["runs"]] == [40.0, "inf"]
    for run in doc["runs"]:
        assert run["summary"]["completed"] == 6
        assert run["summary"]["slo_attainment"] == 1.0
    prompts = [b["prompt"] for b in fake.bodies]
    assert sorted(prompts[:6]) == sorted(prompts[6:])
    poisson_starts = [r["start_s"] for r in doc["runs"][0]["requests"]]
    assert max(poisson_starts) > 0.02  # spread over time, not a burst
    assert max(r["start_s"] for r in doc["runs"][1]["requests"]) < max(poisson_starts)
    assert_png(plot)
    assert "goodput" in capsys.readouterr().out


def test_errors_are_counted_by_kind(tmp_path, capsys):
    # requests 3, 6, 9 -> 500; 4, 8 -> cut stream; 5 -> stalls past the read timeout
    fake = FakeServer(first_delay_s=0.0, gap_s=0.005, usage=False, fail_every=3, truncate_every=4, stall_every=5)
    with serve(fake) as url:
        doc = bench(url, tmp_path, "--num-prompts", "9", "--input-len", "5", "--output-len", "5",
                    "--max-concurrency", "1", "--timeout-s", "0.3", "--request-timeout-s", "5", status=1)
    # more failures than --max-failure-ratio: the exit status says so, with the first failure's message
    last = capsys.readouterr().err.splitlines()[-1]
    assert "6 of 9 requests failed" in last and last.endswith("the first: http_500: injected failure")
    s = doc["runs"][0]["summary"]
    assert s["errors"] == {"http_500": 3, "truncated_stream": 2, "timeout": 1}
    assert (s["completed"], s["failed"]) == (3, 6)
    assert s["slo_attainment"] == pytest.approx(3 / 9)
    assert s["total_output_tokens"] == 3 * 3  # no usage: counted chunks (5 tokens in 3 chunks)
    failed = [r for r in doc["runs"][0]["requests"] if r["error"] == "http_500"]
    assert "injected failure" in failed[0]["error_detail"]
    assert all(r["output_tokens_source"] == "chunks" for r in doc["runs"][0]["requests"])


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_tokens_with_empty_text_count(tmp_path, endpoint):
    # a random checkpoint's tokens may decode to nothing: the chunks still carry them
    fake = FakeServer(first_delay_s=0.05, gap_s=0.01, tokens_per_chunk=1, token_text="")
    with serve(fake) as url:
        doc = bench(url, tmp_path, "--endpoint", endpoint, "--num-prompts", "4", "--input-len", "5",
                    "--output-len", "6", "--max-concurrency", "2")
    s = doc["runs"][0]["summary"]
    assert (s["completed"], s["failed"], s["errors"]) == (4, 0, {})
    assert s["total_output_tokens"] == 4 * 6
    assert s["ttft_ms"]["min"] >= 50  # the first token chunk, not the chat role announcement
    assert s["itl_ms"]["count"] == 4 * 5
    assert s["tpot_ms"]["count"] == 4


def test_a_stream_without_tokens_fails(tmp_path):
    fake = FakeServer(first_delay_s=0.0, max_output=0)
    with serve(fake) as url:
        doc = bench(url, tmp_path, "--num-prompts", "2", "--input-len", "5", "--output-len", "4", status=1)
    s = doc["runs"][0]["summary"]
    assert (s["completed"], s["errors"]) == (0, {"no_output_tokens": 2})
    assert "usage.completion_tokens=0" in doc["runs"][0]["requests"][0]["error_detail"]


def test_unreachable_server(tmp_path, capsys):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    doc = bench(url, tmp_path, "--model", "m", "--num-prompts", "2", "--input-len", "4", "--output-len", "2",
                status=1)
    assert doc["runs"][0]["summary"]["errors"] == {"connect_error": 2}
    assert main(["--url", url, "--out", str(tmp_path / "x.json"), "--progress", "false"]) == 1
    assert "cannot list models" in capsys.readouterr().err


def test_connection_closed_before_a_response(tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def accept_and_close(n: int) -> None:
        for _ in range(n):
            conn, _ = listener.accept()
            conn.recv(65536)
            conn.close()

    thread = threading.Thread(target=accept_and_close, args=(3,), daemon=True)  # the model list, 2 requests
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        doc = bench(url, tmp_path, "--model", "m", "--num-prompts", "2", "--input-len", "4", "--output-len", "2",
                    "--max-concurrency", "1", status=1)
    finally:
        thread.join(10)
        listener.close()
    assert doc["runs"][0]["summary"]["errors"] == {"disconnected": 2}


def make_tokenizer(tmp_path) -> str:
    """A small byte-level BPE trained here, saved as <dir>/tokenizer.json; returns the dir."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog", "prefill and decode run on separate engines",
              "tokens stream back to the client over server sent events"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, show_progress=False, special_tokens=["<s>", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    return str(tmp_path)


def test_random_prompts_have_exact_token_lengths(tmp_path):
    file = Path(make_tokenizer(tmp_path)) / "tokenizer.json"
    tok = Tokenizer.from_file(str(file))
    ds = random_dataset(30, 40, 8, 0.5, seed=3, tokenizer_path=file)
    assert ds.length_method == EXACT
    lengths = [s.prompt_len for s in ds.samples]
    assert min(lengths) >= 20 and max(lengths) <= 60 and len(set(lengths)) > 5
    for s in ds.samples:
        assert len(tok.encode(s.prompt, add_special_tokens=False).ids) == s.prompt_len
        assert "<s>" not in s.prompt
        assert 4 <= s.output_len <= 12
    again = random_dataset(30, 40, 8, 0.5, seed=3, tokenizer_path=file)
    assert [s.prompt for s in again.samples] == [s.prompt for s in ds.samples]


@pytest.mark.parametrize("entry", ["id", "root"])
def test_the_servers_model_directory_gives_exact_lengths(tmp_path, capsys, entry):
    # pdserve lists a local model by its path; vLLM lists a served name with the path as its root
    model_dir = make_tokenizer(tmp_path)
    listed = {"id": model_dir} if entry == "id" else {"id": "served-name", "root": model_dir}
    with serve(FakeServer(first_delay_s=0.0, gap_s=0.0, models=[listed | {"object": "model"}])) as url:
        doc = bench(url, tmp_path, "--num-prompts", "3", "--input-len", "12", "--output-len", "2")
    assert doc["dataset"]["length_method"] == EXACT and doc["dataset"]["mean_prompt_len"] == 12
    assert doc["dataset"]["tokenizer"] == str(Path(model_dir) / "tokenizer.json")
    captured = capsys.readouterr()
    assert "WARNING" not in captured.err
    assert "prompt length: 12.0 tokens by" in captured.out


def test_a_hub_model_uses_the_tokenizer_in_the_local_hub_cache(tmp_path):
    # vLLM lists a hub id; the Hugging Face cache layout: refs/main names the snapshot holding the files
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer.json").write_bytes((Path(make_tokenizer(tmp_path)) / "tokenizer.json").read_bytes())
    with serve(FakeServer(first_delay_s=0.0, gap_s=0.0, models=[{"id": "org/tiny", "object": "model"}])) as url:
        run = subprocess.run([sys.executable, "-m", "services.cli", "bench", "--url", url, "--num-prompts", "2",
                              "--input-len", "10", "--output-len", "2", "--progress", "false"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_CACHE": str(tmp_path / "hub"),
                                  "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    assert f"prompt length: 10.0 tokens by {snapshot / 'tokenizer.json'}" in run.stdout


def test_pdserves_demo_model_without_a_writable_cache_is_one_clear_line(tmp_path):
    (tmp_path / "cache").write_text("a file, not a directory")
    demo = {"id": "demo", "object": "model", "owned_by": "pdserve"}
    with serve(FakeServer(first_delay_s=0.0, gap_s=0.0, models=[demo])) as url:
        run = subprocess.run([sys.executable, "-m", "services.cli", "bench", "--url", url, "--progress", "false"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(ROOT), "PDSERVE_CACHE_DIR": str(tmp_path / "cache")})
    assert run.returncode == 1
    assert run.stderr.startswith("pdserve bench: cannot write the demo model's tokenizer (")
    assert run.stderr.rstrip().endswith("set PDSERVE_CACHE_DIR or pass --tokenizer")
    assert len(run.stderr.strip().splitlines()) == 1


def test_approximate_lengths_warn_and_record_the_servers_count(tmp_path, capsys):
    # a byte-level tokenizer makes several tokens of each word: the server's count is the real length
    with serve(FakeServer(first_delay_s=0.0, gap_s=0.0, tokens_per_word=3)) as url:
        doc = bench(url, tmp_path, "--num-prompts", "4", "--input-len", "20", "--output-len", "2")
    dataset = doc["dataset"]
    assert dataset["length_method"] == "approx-words" and dataset["tokenizer"] is None
    assert dataset["mean_prompt_words"] == 20 and "mean_prompt_len" not in dataset  # words are not tokens
    assert dataset["measured_mean_prompt_len"] == 60
    measured = doc["runs"][0]["summary"]["measured_prompt_len"]
    assert measured == {"count": 4, "mean": 60, "min": 60, "max": 60}
    assert all(r["prompt_tokens_source"] == "usage" for r in doc["runs"][0]["requests"])
    captured = capsys.readouterr()
    first, *_, last = captured.err.strip().splitlines()
    assert "WARNING: no tokenizer found for model 'tiny-test'" in first and "--tokenizer" in first
    assert last == ("WARNING: APPROXIMATE prompt lengths: 20.0 words per prompt, the server counted 60.0 tokens "
                    "on average; pass --tokenizer for exact lengths")
    assert re.search(r"^Mean input tokens \(server\) +60\.00$", captured.out, re.M)


def test_failures_beyond_the_ratio_exit_1_with_the_servers_message(tmp_path, capsys):
    with serve(FakeServer(first_delay_s=0.0, gap_s=0.0)) as url:
        doc = bench(url, tmp_path, "--model", "nosuch", "--num-prompts", "3", "--input-len", "4",
                    "--output-len", "2", status=1)
        assert doc["runs"][0]["summary"]["errors"] == {"http_404": 3}
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err == ("pdserve bench: 3 of 3 requests failed at rate inf (more than --max-failure-ratio 0.05); "
                       "the first: http_404: The model `nosuch` does not exist.")
        bench(url, tmp_path, "--model", "nosuch", "--num-prompts", "3", "--input-len", "4", "--output-len", "2",
              "--max-failure-ratio", "1")


def test_nothing_is_written_without_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with serve(FakeServer(first_delay_s=0.0, gap_s=0.0)) as url:
        assert main(["--url", url, "--num-prompts", "2", "--input-len", "4", "--output-len", "2",
                     "--progress", "false"]) == 0
    assert list(tmp_path.iterdir()) == []
    assert "results: not written (no --out)" in capsys.readouterr().out


def test_chat_with_jsonl_messages(tmp_path):
    lines = [{"messages": [{"role": "user", "content": f"hello number {i}"}], "output_len": 2 + i} for i in range(4)]
    lines.insert(2, {"prompt": "plain prompt here"})
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    fake = FakeServer(first_delay_s=0.01, gap_s=0.005, tokens_per_chunk=1)
    with serve(fake) as url:
        doc = bench(url, tmp_path, "--endpoint", "chat", "--dataset", str(data), "--num-prompts", "5",
                    "--output-len", "3", "--tokenizer", make_tokenizer(tmp_path), "--max-concurrency", "1")
    s = doc["runs"][0]["summary"]
    assert s["completed"] == 5 and s["errors"] == {}
    assert doc["dataset"]["length_method"] == EXACT
    assert [b["max_tokens"] for b in fake.bodies] == [2, 3, 3, 4, 5]
    assert fake.bodies[2]["messages"] == [{"role": "user", "content": "plain prompt here"}]
    assert s["total_output_tokens"] == 17
    # the role-only first chunk is not a token: one gap less than tokens
    assert s["itl_ms"]["count"] == 17 - 5


def test_jsonl_errors_name_the_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    with pytest.raises(DatasetError, match="bad.jsonl:2"):
        jsonl_dataset(str(data), 2, 4, None, chat=False)
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DatasetError, match="--endpoint chat"):
        jsonl_dataset(str(data), 1, 4, None, chat=False)
    with pytest.raises(DatasetError, match="fewer than --num-prompts"):
        jsonl_dataset(str(data), 2, 4, None, chat=True)
    data.write_text("not json\n")
    with pytest.raises(DatasetError, match="invalid JSON"):
        jsonl_dataset(str(data), 1, 4, None, chat=True)


def test_poisson_arrivals():
    assert arrival_offsets(3, math.inf, 0) == [0.0, 0.0, 0.0]
    offsets = arrival_offsets(4000, 10.0, seed=7)
    assert offsets == arrival_offsets(4000, 10.0, seed=7)
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert min(gaps) > 0
    assert sum(gaps) / len(gaps) == pytest.approx(0.1, rel=0.1)
    # exponential: about e^-1 of the gaps exceed the mean
    assert sum(g > 0.1 for g in gaps) / len(gaps) == pytest.approx(math.exp(-1), abs=0.05)


@pytest.mark.parametrize("flags, message", [
    (["--num-prompts", "0"], "--num-prompts"),
    (["--request-rate", "-1"], "--request-rate"),
    (["--sweep-rate", "1,0"], "--sweep-rate"),
    (["--range-ratio", "1.5"], "--range-ratio"),
    (["--max-concurrency", "0"], "--max-concurrency"),
    (["--slo-ttft-ms", "-5"], "--slo-ttft-ms"),
    (["--timeout-s", "inf"], "--timeout-s"),
    (["--url", "localhost:8000"], "--url"),
    (["--dataset", "missing.jsonl"], "--dataset"),
    (["--tokenizer", "/nonexistent"], "--tokenizer"),
    (["--plot", "out.jpg"], "--plot"),
])
def test_bad_flags_get_clear_errors(flags, message, capsys):
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("pdserve bench: " + message)


def test_bad_flag_types_are_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--endpoint", "embeddings"])
    assert e.value.code == 2
    assert "not one of completions, chat" in capsys.readouterr().err
