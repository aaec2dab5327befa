"""``pdserve bench``: load an OpenAI-compatible server and measure it from the client.

Sends streaming completions or chat completions (``stream_options.include_usage``,
``max_tokens`` = output length, ``ignore_eos``) with Poisson arrivals at
``--request-rate`` (``inf``: all at once) under an optional concurrency cap,
times every chunk that carries a token (counted from ``usage`` and the chunks, not
from text: a token may decode to nothing; see ``bench.stream_tokens``), and reports
TTFT, TPOT, ITL, E2E, throughputs, goodput and errors by kind (see
``bench.serving_stats``) as a table on stdout and, when asked for, a JSON file
(``--out``) and a PNG (``--plot``).  ``--sweep-rate`` repeats the run per rate with
the same prompts.  Works against pdserve, vLLM and SGLang.

Prompt lengths are exact when a tokenizer is found (``--tokenizer``, else the
model's own: see ``find_tokenizer``); otherwise a warning says they are
approximate, and the table shows the server's count either way.  More failed
requests than ``--max-failure-ratio`` of a run make the exit status 1, with the
first failure's message.

Error kinds: ``http_<status>``, ``timeout``, ``connect_error``,
``truncated_stream`` (the stream ended or broke before ``[DONE]``),
``disconnected`` (the connection closed before a response status),
``stream_error`` (an error object inside the stream), ``invalid_response``
(a data line that is not JSON), ``no_output_tokens`` (the server reported zero
output tokens, or no chunk carried one), ``transport_error`` (any other HTTP
transport failure).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx
from tqdm import tqdm

from bench.datasets import (EXACT, Dataset, DatasetError, Sample, jsonl_dataset, model_tokenizer, random_dataset,
                            tokenizer_file)
from bench.serving_report import failure_report, format_run, format_sweep, length_report, measured_mean_prompt_len
from bench.serving_stats import RequestRecord, Run, summarize
from bench.stream_tokens import StreamTokens
from common.config import ConfigError, add_arguments, from_args, opt, require
from common.errors import PdserveError

logger = logging.getLogger(__name__)

ENDPOINT_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
ERROR_DETAIL_CHARS = 300


class BenchError(PdserveError):
    """The benchmark cannot run against this server (e.g. it lists no model)."""


@dataclass
class BenchConfig:
    url: str = opt("http://127.0.0.1:8000", "base URL of the OpenAI-compatible server (with or without /v1)")
    model: str | None = opt(None, "model name to request; default: the first of GET /v1/models")
    tokenizer: str | None = opt(None, "tokenizer.json or model dir for exact prompt lengths; default: the model's own "
                                      "when found: a local dir named by the model or the server's /v1/models entry, "
                                      "pdserve's demo model, or a hub id in the local Hugging Face cache")
    endpoint: Literal["completions", "chat"] = opt("completions", "which API to call")
    dataset: str = opt("random", "'random' or a JSONL file of {prompt|messages[, output_len]} lines")
    num_prompts: int = opt(100, "number of requests per run")
    input_len: int = opt(1024, "random dataset: prompt length in tokens")
    output_len: int = opt(128, "output length in tokens (max_tokens); JSONL lines may override it")
    range_ratio: float = opt(0.0, "random dataset: lengths uniform in [L*(1-r), L*(1+r)]")
    request_rate: float = opt(math.inf, "requests/s with Poisson arrivals; inf sends all at once")
    sweep_rate: list[float] = opt([], "comma-separated rates: one run per rate, same prompts (replaces "
                                  "--request-rate); a server with prefix caching then serves later rates partly "
                                  "from cache: for cold prompts run one rate per invocation with its own --seed")
    seed: int = opt(0, "seed of the random dataset and the arrival times")
    max_concurrency: int | None = opt(None, "most requests in flight at once; none: unlimited")
    slo_ttft_ms: float | None = opt(None, "TTFT SLO for goodput; none: always met")
    slo_tpot_ms: float | None = opt(None, "TPOT SLO for goodput; none: always met")
    ignore_eos: bool = opt(True, "send ignore_eos=true so every request produces output_len tokens")
    timeout_s: float = opt(30.0, "connect timeout and longest wait for the next chunk")
    request_timeout_s: float = opt(600.0, "longest time for one whole request")
    api_key: str | None = opt(None, "bearer token sent as Authorization, if the server wants one")
    max_failure_ratio: float = opt(0.05, "exit with status 1 when more than this fraction of a run's requests fail")
    out: str | None = opt(None, "JSON results file; none: no file is written")
    plot: str | None = opt(None, "PNG file: latency CDFs + throughput over time (sweep: goodput, p99 TPOT vs rate)")
    progress: bool = opt(True, "show a progress bar on stderr")

    def validate(self) -> None:
        require(self.url.startswith(("http://", "https://")), "url", "must start with http:// or https://")
        require(self.model is None or bool(self.model.strip()), "model", "must not be empty")
        require(self.tokenizer is None or tokenizer_file(self.tokenizer) is not None,
                "tokenizer", f"{self.tokenizer!r} is not a tokenizer.json file or a directory holding one")
        require(self.dataset == "random" or os.path.isfile(self.dataset),
                "dataset", f"'random' or an existing JSONL file, not {self.dataset!r}")
        require(self.num_prompts >= 1, "num_prompts", "must be >= 1")
        require(self.input_len >= 1, "input_len", "must be >= 1")
        require(self.output_len >= 1, "output_len", "must be >= 1")
        require(0 <= self.range_ratio < 1, "range_ratio", "must be in [0, 1)")
        require(self.request_rate > 0, "request_rate", "must be > 0 (or inf)")
        require(all(r > 0 for r in self.sweep_rate), "sweep_rate", "every rate must be > 0 (or inf)")
        require(self.max_concurrency is None or self.max_concurrency >= 1, "max_concurrency", "must be >= 1")
        for name in ("slo_ttft_ms", "slo_tpot_ms"):
            value = getattr(self, name)
            require(value is None or 0 < value < math.inf, name, "must be a finite number > 0")
        for name in ("timeout_s", "request_timeout_s"):
            require(0 < getattr(self, name) < math.inf, name, "must be a finite number > 0")
        require(0 <= self.max_failure_ratio <= 1, "max_failure_ratio", "must be in [0, 1]")
        require(self.out is None or bool(self.out), "out", "must name a file")
        require(self.plot is None or self.plot.endswith(".png"), "plot", "must be a .png file")

    @property
    def base_url(self) -> str:
        base = self.url.rstrip("/")
        return base[: -len("/v1")] if base.endswith("/v1") else base

    @property
    def rates(self) -> list[float]:
        return self.sweep_rate or [self.request_rate]


def find_tokenizer(config: BenchConfig, model: str, entry: dict | None) -> Path | None:
    """``--tokenizer``, else the first of the model's name and the ``root`` of its ``/v1/models``
    entry (vLLM's: the model's path) that ``model_tokenizer`` resolves; None when none does."""
    if config.tokenizer:
        return tokenizer_file(config.tokenizer)
    entry = entry or {}
    pdserve = entry.get("owned_by") == "pdserve"
    for name in dict.fromkeys(n for n in (model, entry.get("root")) if isinstance(n, str) and n):
        if (file := model_tokenizer(name, pdserve_demo=pdserve)) is not None:
            return file
    return None


def load_dataset(config: BenchConfig, tokenizer: Path | None) -> Dataset:
    if config.dataset == "random":
        return random_dataset(config.num_prompts, config.input_len, config.output_len,
                              config.range_ratio, config.seed, tokenizer)
    return jsonl_dataset(config.dataset, config.num_prompts, config.output_len, tokenizer, config.endpoint == "chat")


def arrival_offsets(n: int, rate: float, seed: int) -> list[float]:
    """Send times (s from the start): Poisson process at ``rate``; all zero for ``inf``."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in range(n):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


def request_body(config: BenchConfig, model: str, sample: Sample) -> dict:
    body: dict = {
        "model": model,
        "max_tokens": sample.output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
    }
    if config.ignore_eos:
        body["ignore_eos"] = True
    if config.endpoint == "chat":
        body["messages"] = sample.messages or [{"role": "user", "content": sample.prompt}]
    else:
        body["prompt"] = sample.prompt
    return body


async def read_stream(response: httpx.Response, record: RequestRecord, sent: float) -> None:
    """Time the token-bearing chunks of an SSE response into ``record`` (sets ``error`` on failure)."""
    stream = StreamTokens()
    done = False
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            done = True
            break
        try:
            obj = json.loads(data)
        except json.JSONDecodeError:
            record.error, record.error_detail = "invalid_response", data[:ERROR_DETAIL_CHARS]
            return
        if not isinstance(obj, dict) or "error" in obj:
            record.error, record.error_detail = "stream_error", data[:ERROR_DETAIL_CHARS]
            return
        stream.add(obj, time.perf_counter())
    record.e2e_s = time.perf_counter() - sent
    stream.close()
    if stream.prompt_tokens is not None:
        record.prompt_tokens, record.prompt_tokens_source = stream.prompt_tokens, "usage"
    record.output_tokens, record.output_tokens_source = stream.output_tokens, stream.source
    if stream.times:
        record.ttft_s = stream.times[0] - sent
        record.itl_s = [b - a for a, b in zip(stream.times, stream.times[1:])]
    if not done:
        record.error = "truncated_stream"
    elif not stream.times or record.output_tokens == 0:
        record.error = "no_output_tokens"
        record.error_detail = (f"usage.completion_tokens={stream.usage_tokens}; "
                               f"{len(stream.times)} chunks carried a token")


async def send_request(
    client: httpx.AsyncClient, config: BenchConfig, url: str, body: dict, record: RequestRecord, t0: float
) -> None:
    """Send one streaming request and fill ``record``; never raises for request failures."""
    sent = time.perf_counter()
    record.start_s = sent - t0
    streaming = False
    try:
        async with asyncio.timeout(config.request_timeout_s):
            async with client.stream("POST", url, json=body) as response:
                if response.status_code != 200:
                    record.error = f"http_{response.status_code}"
                    record.error_detail = (await response.aread()).decode(errors="replace")[:ERROR_DETAIL_CHARS]
                    return
                streaming = True
                await read_stream(response, record, sent)
    except TimeoutError:
        record.error = "timeout"
        record.error_detail = f"not done within --request-timeout-s {config.request_timeout_s:g}"
    except httpx.TimeoutException as e:
        record.error = "timeout"
        record.error_detail = f"{type(e).__name__}: nothing within --timeout-s {config.timeout_s:g}"
    except httpx.ConnectError as e:
        record.error, record.error_detail = "connect_error", str(e)[:ERROR_DETAIL_CHARS]
    except (httpx.RemoteProtocolError, httpx.ReadError) as e:
        record.error = "truncated_stream" if streaming else "disconnected"
        record.error_detail = str(e)[:ERROR_DETAIL_CHARS]
    except httpx.HTTPError as e:
        record.error, record.error_detail = "transport_error", f"{type(e).__name__}: {e}"[:ERROR_DETAIL_CHARS]
    if record.error is not None:
        record.e2e_s = None


async def list_models(client: httpx.AsyncClient, config: BenchConfig) -> list[dict]:
    """The entries of the server's ``GET /v1/models``; BenchError when it cannot be read."""
    url = config.base_url + "/v1/models"
    try:
        response = await client.get(url)
        response.raise_for_status()
        models = response.json().get("data") or []
    except (httpx.HTTPError, ValueError, AttributeError) as e:
        raise BenchError(f"cannot list models at {url}: {e}") from e
    if not isinstance(models, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str) for m in models):
        raise BenchError(f"{url} answered a model list without string ids")
    return models


async def resolve_model(client: httpx.AsyncClient, config: BenchConfig) -> tuple[str, dict | None]:
    """The model to request and its ``/v1/models`` entry: ``--model`` (entry None when the list lacks
    it or cannot be read), else the first model listed."""
    try:
        models = await list_models(client, config)
    except BenchError:
        if config.model:
            return config.model, None
        raise
    if config.model:
        return config.model, next((m for m in models if m["id"] == config.model), None)
    if not models:
        raise BenchError(f"{config.base_url}/v1/models lists no model; pass --model")
    return models[0]["id"], models[0]


async def run_once(
    client: httpx.AsyncClient, config: BenchConfig, model: str, dataset: Dataset, rate: float
) -> tuple[list[RequestRecord], float]:
    """One run at ``rate``: every sample once; returns the records and the run's duration."""
    url = config.base_url + ENDPOINT_PATHS[config.endpoint]
    offsets = arrival_offsets(len(dataset.samples), rate, config.seed)
    limit = asyncio.Semaphore(config.max_concurrency or len(dataset.samples))
    records = [RequestRecord(i, 0.0, s.prompt_len) for i, s in enumerate(dataset.samples)]
    bar = tqdm(total=len(records), desc=f"rate {rate:g}", unit="req", file=sys.stderr, disable=not config.progress)

    async def one(sample: Sample, record: RequestRecord) -> None:
        async with limit:
            await send_request(client, config, url, request_body(config, model, sample), record, t0)
        bar.update(1)

    t0 = time.perf_counter()
    tasks = []
    try:
        for sample, record, offset in zip(dataset.samples, records, offsets):
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(sample, record)))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        bar.close()
    return records, time.perf_counter() - t0


APPROX_WARNING = ("WARNING: no tokenizer found for model {model!r} (no --tokenizer; the model is not a local "
                  "directory, pdserve's demo model or in the Hugging Face cache): prompt lengths are APPROXIMATE "
                  "(one word ~ one token; a byte-level tokenizer makes ~3 of each).  Pass --tokenizer (a "
                  "tokenizer.json or a model directory) for exact lengths.")


async def run_benchmark(config: BenchConfig) -> tuple[str, Dataset, list[Run]]:
    """The model asked for, the prompts, and every run of ``config`` (one per rate, same prompts)."""
    limits = httpx.Limits(max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency)
    timeout = httpx.Timeout(config.timeout_s)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else None
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as client:
        model, entry = await resolve_model(client, config)
        dataset = load_dataset(config, find_tokenizer(config, model, entry))
        logger.info("dataset: %s", dataset.describe())
        if dataset.length_method != EXACT:
            print(f"pdserve bench: {APPROX_WARNING.format(model=model)}", file=sys.stderr)
        runs = []
        for rate in config.rates:
            records, duration = await run_once(client, config, model, dataset, rate)
            runs.append(Run(rate, records, summarize(records, duration, config.slo_ttft_ms, config.slo_tpot_ms)))
    return model, dataset, runs


def results_document(config: BenchConfig, model: str, dataset: Dataset, runs: list[Run]) -> dict:
    """What ``--out`` holds: config (without the API key), dataset, and per run summary + requests."""
    return json_safe({
        "tool": "pdserve bench",
        "model": model,
        "config": dataclasses.asdict(config) | {"api_key": None},
        "dataset": dataset.describe() | {"measured_mean_prompt_len": measured_mean_prompt_len(runs)},
        "runs": [run.to_json() for run in runs],
    })


def json_safe(value):
    """``value`` with non-finite floats written as the strings 'inf', '-inf', 'nan'."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def write_outputs(config: BenchConfig, document: dict, model: str, runs: list[Run]) -> None:
    """``--out`` and ``--plot``, those that were given."""
    if config.out:
        out = Path(config.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(document, indent=1, allow_nan=False))
    if config.plot:
        from bench.serving_plot import plot_latency, plot_sweep  # matplotlib only when asked for

        Path(config.plot).parent.mkdir(parents=True, exist_ok=True)
        if len(runs) > 1:
            plot_sweep([run.rate for run in runs], [run.summary for run in runs], config.plot)
        else:
            plot_latency(runs[0].records, config.plot, title=f"{model} @ {runs[0].rate:g} req/s")


def main(argv: list[str] | None = None) -> int:
    """``pdserve bench``: 0 on a finished benchmark, 2 on a bad flag, 1 when it cannot run or more requests
    failed than ``--max-failure-ratio`` allows."""
    parser = argparse.ArgumentParser(prog="pdserve bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser, BenchConfig)
    try:
        config = from_args(BenchConfig, parser.parse_args(argv))
    except ConfigError as e:
        print(f"pdserve bench: {e}", file=sys.stderr)
        return 2
    try:
        model, dataset, runs = asyncio.run(run_benchmark(config))
    except (BenchError, DatasetError) as e:
        print(f"pdserve bench: {e}", file=sys.stderr)
        return 1
    for run in runs:
        print(format_run(f"pdserve bench: {model}", run.rate, run.summary))
    if len(runs) > 1:
        print(format_sweep(runs))
    lengths = length_report(dataset, runs)
    print(lengths, file=sys.stdout if dataset.length_method == EXACT else sys.stderr)
    write_outputs(config, results_document(config, model, dataset, runs), model, runs)
    print(f"dataset: {dataset.source} ({dataset.length_method}); results: {config.out or 'not written (no --out)'}")
    if (failure := failure_report(runs, config.max_failure_ratio)) is not None:
        print(f"pdserve bench: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
