"""P/D vs colocated evaluation (issue 6): the same workload against each configuration.

    python -m bench.eval_pd --rates 1,2,3,4,6 --num-prompts 40 --out-dir docs/eval --tag cpu

For each configuration (``disagg``: ``--prefill`` + ``--decode`` instances; ``colocated``:
``--colocated`` role-``both`` instances, the same process count by default) the driver:

1. starts the stack with ``pdserve up`` on free ports (with ``--gpus``, each engine pinned to
   one GPU) and waits for the gateway's ``/ready``;
2. sends one greedy completion (``--check-tokens``) and keeps its text and its tokens (from
   ``logprobs``; text alone can hide tokens that decode to nothing): the configurations must
   agree token for token (same weights, greedy, EOS ignored);
3. handoff run: ``--handoff-prompts`` requests at most one in flight, scraping the gateway's
   ``/metrics`` before and after, so every ``pdserve_gateway_*_seconds`` histogram's mean over
   the run is known (see ``handoff_split``);
4. sweep: one ``pdserve bench`` run per rate of ``--rates`` (Poisson arrivals), each with its
   own seed — the same prompts at every rate would hit the prefix cache from the second rate
   on — and a ``/metrics`` scrape around each;
5. stops the stack (SIGTERM, then SIGKILL after ``--stop-timeout-s``).

Writes ``<tag>.json`` (summaries, metric means, the handoff split; no per-request records),
``<tag>_sweep.png`` (goodput, SLO attainment, TTFT and TPOT percentiles against the rate),
``<tag>_handoff.png`` (TTFT and first inter-token gap split by component) and ``<tag>.md``
(the side-by-side tables) under ``--out-dir``, by default ``<work-dir>/<tag>`` beside the raw
bench outputs and process logs: the committed results in ``docs/eval`` change only when
``--out-dir docs/eval`` says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.processes import free_port
from common.config import ConfigError, add_arguments, from_args, opt, require
from common.errors import PdserveError

log = logging.getLogger(__name__)

MODES = ("disagg", "colocated")
CHECK_PROMPT = "Prefill and decode must agree on every token of this greedy completion."
# The gateway's latency histograms; ``handoff_split`` names those it reads without the suffix.
HIST = "pdserve_gateway_{}_seconds"


class EvalError(PdserveError):
    """A configuration could not be started, checked or measured."""


@dataclass
class EvalConfig:
    model: str = opt("demo", "model directory, or 'demo' (the demo checkpoint's directory, for exact lengths)")
    modes: list[str] = opt(list(MODES), "configurations to measure, in order")
    prefill: int = opt(1, "prefill instances (disagg)")
    decode: int = opt(1, "decode instances (disagg)")
    colocated: int = opt(2, "role-both instances (colocated)")
    engine_args: str = opt("--num-kv-blocks 2048 --max-num-batched-tokens 1024 --dtype float32 --device cpu",
                           "flags for every engine")
    prefill_args: str = opt("", "flags for the prefill engines only (pdserve up --prefill-args), e.g. '-tp 2'")
    decode_args: str = opt("", "flags for the decode engines only (pdserve up --decode-args)")
    gateway_args: str = opt("", "flags for the gateway")
    gpus: list[int] = opt([], "GPUs of the engines, as many per engine as its TP size (pdserve up --gpus); "
                              "empty: no pinning")
    threads: int = opt(1, "OMP_NUM_THREADS of every process of the stack (0: leave unset)")
    input_len: int = opt(768, "prompt length in tokens (mean)")
    range_ratio: float = opt(0.333, "prompt lengths uniform in [L*(1-r), L*(1+r)]")
    output_len: int = opt(64, "output tokens per request (EOS ignored)")
    num_prompts: int = opt(40, "requests per rate")
    rates: list[float] = opt([1.0, 2.0, 3.0, 4.0, 6.0], "request rates of the sweep (req/s, Poisson)")
    seed: int = opt(0, "seed of the first run; every run adds its index")
    slo_ttft_ms: float = opt(2000.0, "TTFT SLO of goodput (ms)")
    slo_tpot_ms: float = opt(50.0, "TPOT SLO of goodput (ms)")
    handoff_prompts: int = opt(16, "requests of the handoff run, one in flight (0: skip it)")
    check_tokens: int = opt(32, "tokens of the greedy agreement check (0: skip it)")
    out_dir: str | None = opt(None, "where the JSON, PNG and Markdown results go; default: <work-dir>/<tag> "
                                    "(pass docs/eval to replace the committed results)")
    tag: str = opt("cpu", "file name prefix of the results")
    work_dir: str = opt("/tmp/pdserve-eval", "raw bench JSON and process logs")
    ready_timeout_s: float = opt(240.0, "give up if a stack is not ready after this long")
    run_timeout_s: float = opt(300.0, "give up on one bench run after this long")
    stop_timeout_s: float = opt(30.0, "SIGKILL a stack that has not stopped this long after SIGTERM")
    log_level: str = opt("warning", "log level of the stack's processes")

    def validate(self) -> None:
        require(bool(self.modes) and all(m in MODES for m in self.modes), "modes", f"each one of {MODES}")
        require(len(set(self.modes)) == len(self.modes), "modes", "no configuration twice")
        require(self.prefill >= 1 and self.decode >= 1 and self.colocated >= 1, "prefill", "instances must be >= 1")
        require(all(g >= 0 for g in self.gpus), "gpus", "GPU ids are >= 0")
        require(self.threads >= 0, "threads", "must be >= 0")
        require(self.input_len >= 1 and self.output_len >= 2, "input_len", "input >= 1 and output >= 2 tokens")
        require(0 <= self.range_ratio < 1, "range_ratio", "must be in [0, 1)")
        require(self.num_prompts >= 1, "num_prompts", "must be >= 1")
        require(bool(self.rates) and all(0 < r < math.inf for r in self.rates), "rates", "finite rates > 0")
        require(0 < self.slo_ttft_ms < math.inf and 0 < self.slo_tpot_ms < math.inf, "slo_ttft_ms",
                "SLOs must be finite and > 0")
        require(self.handoff_prompts >= 0 and self.check_tokens >= 0, "handoff_prompts", "must be >= 0")
        require(bool(self.tag) and "/" not in self.tag, "tag", "a plain file name prefix")
        for name in ("ready_timeout_s", "run_timeout_s", "stop_timeout_s"):
            require(0 < getattr(self, name) < math.inf, name, "must be a finite number > 0")

    def model_dir(self) -> str:
        if self.model != "demo":
            return self.model
        from common.engine.demo_model import ensure_demo_checkpoint

        return str(ensure_demo_checkpoint())


class Stack:
    """One configuration's ``pdserve up`` on free ports."""

    def __init__(self, config: EvalConfig, mode: str, model: str, logs: Path):
        self.config, self.mode, self.model = config, mode, model
        self.port, self.registry_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(logs / f"{mode}.log", "ab")
        self.proc: subprocess.Popen | None = None
        self.command = ""

    def start(self) -> None:
        c = self.config
        counts = (["--prefill", str(c.prefill), "--decode", str(c.decode), f"--prefill-args={c.prefill_args}",
                   f"--decode-args={c.decode_args}"] if self.mode == "disagg" else ["--colocated", str(c.colocated)])
        gpus = ["--gpus", ",".join(map(str, c.gpus))] if c.gpus else []
        argv = ["up", "--mode", self.mode, *counts, *gpus, "--model", self.model, "--port", str(self.port),
                "--registry-port", str(self.registry_port), "--engine-args", c.engine_args,
                "--gateway-args", c.gateway_args, "--ready-timeout-s", str(c.ready_timeout_s),
                "--log-level", c.log_level]
        env = {**os.environ, "GLOG_minloglevel": "1"}
        if c.threads:
            env["OMP_NUM_THREADS"] = str(c.threads)
        self.command = "pdserve " + " ".join(argv)
        self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", *argv], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EvalError(f"{self.mode}: pdserve up exited during start-up ({self.proc.returncode}); "
                                f"see {self.log.name}")
            try:
                if httpx.get(self.url + "/ready", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise EvalError(f"{self.mode}: not ready after {self.config.ready_timeout_s:g} s; see {self.log.name}")

    def stop(self) -> None:
        """SIGTERM: pdserve up stops its children in order; SIGKILL its group after ``--stop-timeout-s``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.config.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s: pdserve up did not stop in time: killing its group", self.mode)
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def scrape(url: str) -> dict[str, tuple[float, float]]:
    """Every histogram series of ``/metrics``: ``name{labels}`` -> (sum, count)."""
    try:
        text = httpx.get(url + "/metrics", timeout=10.0).text
    except httpx.HTTPError as e:
        raise EvalError(f"scraping {url}/metrics: {type(e).__name__}: {e}") from e
    out: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        if family.type != "histogram":
            continue
        for s in family.samples:
            if s.name.endswith(("_sum", "_count")):
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
                key = family.name + (f"{{{labels}}}" if labels else "")
                out.setdefault(key, [0.0, 0.0])[0 if s.name.endswith("_sum") else 1] = s.value
    return {k: (v[0], v[1]) for k, v in out.items()}


def metric_means(before: dict, after: dict) -> dict[str, dict[str, float]]:
    """Mean and count of every histogram series observed between two scrapes."""
    out = {}
    for key, (total, count) in after.items():
        total0, count0 = before.get(key, (0.0, 0.0))
        if count > count0:
            out[key] = {"mean": (total - total0) / (count - count0), "count": count - count0}
    return out


def mean_ms(means: dict, name: str) -> float | None:
    """Mean of the unlabelled histogram ``pdserve_gateway_<name>_seconds`` in ms; None when not observed."""
    key = HIST.format(name)
    return means[key]["mean"] * 1000 if key in means else None


def bench(config: EvalConfig, url: str, model: str, rate: float, seed: int, n: int, out: Path,
          max_concurrency: int | None = None) -> dict:
    """One ``pdserve bench`` run; returns its results document."""
    argv = [sys.executable, "-m", "services.cli", "bench", "--url", url, "--tokenizer", model,
            "--num-prompts", str(n), "--input-len", str(config.input_len), "--range-ratio", str(config.range_ratio),
            "--output-len", str(config.output_len), "--request-rate", str(rate), "--seed", str(seed),
            "--slo-ttft-ms", str(config.slo_ttft_ms), "--slo-tpot-ms", str(config.slo_tpot_ms),
            "--out", str(out), "--progress", "false", "--max-failure-ratio", "1"]  # failures go in the tables
    if max_concurrency:
        argv += ["--max-concurrency", str(max_concurrency)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=config.run_timeout_s)
    except subprocess.TimeoutExpired as e:
        raise EvalError(f"pdserve bench at rate {rate:g} ran past {config.run_timeout_s:g} s") from e
    if done.returncode != 0:
        raise EvalError(f"pdserve bench failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(out.read_text())


def check_completion(url: str, tokens: int) -> dict:
    """A greedy completion with EOS ignored (also the stack's warm-up) of the first listed model:
    its text, its tokens (``None`` when the server sends no logprobs) and its usage."""
    try:
        name = httpx.get(url + "/v1/models", timeout=10.0).json()["data"][0]["id"]
        body = {"model": name, "prompt": CHECK_PROMPT, "max_tokens": tokens, "temperature": 0.0, "ignore_eos": True,
                "logprobs": 0}
        response = httpx.post(url + "/v1/completions", json=body, timeout=120.0)
    except httpx.HTTPError as e:
        raise EvalError(f"check completion: {type(e).__name__}: {e}") from e
    if response.status_code != 200:
        raise EvalError(f"check completion: HTTP {response.status_code}: {response.text[:300]}")
    doc = response.json()
    choice = doc["choices"][0]
    return {"text": choice["text"], "tokens": (choice.get("logprobs") or {}).get("tokens"), "usage": doc.get("usage")}


def checks_agree(checks: list[dict]) -> bool:
    """Whether check completions (``check_completion``) have the same tokens and text."""
    return len({json.dumps([c["tokens"], c["text"]]) for c in checks}) == 1


def client_first_itl_ms(doc: dict) -> dict[str, float] | None:
    """Mean and median of the clients' first inter-token gaps (ms), None if no request had two tokens."""
    gaps = [r["itl_s"][0] for r in doc["runs"][0]["requests"] if r["error"] is None and r["itl_s"]]
    return {"mean": 1000 * statistics.fmean(gaps), "p50": 1000 * statistics.median(gaps)} if gaps else None


def measure(config: EvalConfig, mode: str, model: str, work: Path) -> dict:
    """Start ``mode``'s stack, check, run the handoff run and the sweep, stop it."""
    stack = Stack(config, mode, model, work)
    result: dict = {"mode": mode}
    try:
        stack.start()
        result["command"] = stack.command
        t0 = time.monotonic()
        stack.wait_ready()
        result["ready_s"] = time.monotonic() - t0
        if config.check_tokens:
            result["check"] = check_completion(stack.url, config.check_tokens)
        seed = config.seed
        if config.handoff_prompts:
            before = scrape(stack.url)
            doc = bench(config, stack.url, model, math.inf, seed, config.handoff_prompts,
                        work / f"{mode}_handoff.json", max_concurrency=1)
            summary = doc["runs"][0]["summary"]
            result["handoff"] = {"summary": summary, "first_itl_ms": client_first_itl_ms(doc),
                                 "metrics": metric_means(before, scrape(stack.url))}
        result["sweep"] = []
        for i, rate in enumerate(config.rates):
            before = scrape(stack.url)
            doc = bench(config, stack.url, model, rate, seed + 1 + i, config.num_prompts,
                        work / f"{mode}_rate{rate:g}.json")
            result["sweep"].append({"rate": rate, "summary": doc["runs"][0]["summary"],
                                    "metrics": metric_means(before, scrape(stack.url))})
            s = result["sweep"][-1]["summary"]
            log.info("%s @ %g req/s: goodput %.2f, p99 TTFT %s ms, p99 TPOT %s ms", mode, rate, s["goodput"],
                     s["ttft_ms"]["p99"], s["tpot_ms"]["p99"])
    finally:
        stack.stop()
    return result


def handoff_split(result: dict) -> dict:
    """TTFT and first inter-token gap of one configuration's handoff run, split by component (ms).

    From the gateway's histograms where it has them, ``None`` where it does not (``missing``).
    Every part is a histogram of its own or an interval minus the intervals nested inside it in
    every request (the engine's times lie inside the gateway's leg), so none is negative; never
    a difference of intervals that start at unordered events (first gap - decode's first output
    is not the dispatch: it went negative).
    TTFT = gateway (TTFT - prefill leg) + bus and engine service (prefill leg - queue - compute)
    + prefill queue + prefill compute, the prefill leg being the first token's leg (``both``
    when colocated).  The first gap in P/D is covered by the gateway's dispatch (prefill's
    first token received to decode Generate sent) + bus, block allocation and handshake
    (decode's first output - transfer - first step) + KV transfer + first decode step;
    colocated it is one batched decode step."""
    m = result["handoff"]["metrics"]
    ttft, leg = mean_ms(m, "ttft"), mean_ms(m, "prefill_leg")
    queue, prefill = mean_ms(m, "prefill_queue"), mean_ms(m, "prefill")
    first_itl, dispatch = mean_ms(m, "first_itl"), mean_ms(m, "decode_dispatch")
    decode_first = mean_ms(m, "decode_first_output")
    transfer, step = mean_ms(m, "kv_transfer"), mean_ms(m, "first_decode_step")

    def minus(total: float | None, *parts: float | None) -> float | None:
        return None if total is None or any(p is None for p in parts) else total - sum(parts)

    ttft_parts = {"gateway": minus(ttft, leg), "bus + engine service": minus(leg, queue, prefill),
                  "prefill queue": queue, "prefill compute": prefill}
    used = {"ttft": ttft, "prefill_leg": leg, "prefill_queue": queue, "prefill": prefill, "first_itl": first_itl}
    if result["mode"] == "disagg":
        itl_parts = {"gateway dispatch": dispatch, "bus + alloc + handshake": minus(decode_first, transfer, step),
                     "KV transfer": transfer, "first decode step": step}
        used |= {"decode_dispatch": dispatch, "decode_first_output": decode_first, "kv_transfer": transfer,
                 "first_decode_step": step}
    else:
        itl_parts = {"decode step (batched)": first_itl}
    return {
        "client_ttft_ms": result["handoff"]["summary"]["ttft_ms"]["mean"],
        "client_ttft_p50_ms": result["handoff"]["summary"]["ttft_ms"]["p50"],
        "client_first_itl_ms": (first_gap := result["handoff"]["first_itl_ms"] or {}).get("mean"),
        "client_first_itl_p50_ms": first_gap.get("p50"),
        "gateway_ttft_ms": ttft, "gateway_first_itl_ms": first_itl,
        "ttft_parts": ttft_parts, "first_itl_parts": itl_parts,
        "missing": sorted(HIST.format(name) for name, v in used.items() if v is None),
    }


def _f(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def tables(results: dict[str, dict]) -> str:
    """The Markdown tables: sweep side by side, then the handoff split."""
    modes = list(results)
    head = "| rate (req/s) | " + " | ".join(
        f"{m} {col}" for col in ("ok/sent", "goodput", "attain", "TTFT p50/p99 (ms)", "TPOT p50/p99 (ms)")
        for m in modes) + " |"
    lines = [head, "|" + "---|" * (1 + 5 * len(modes))]
    for i, rate in enumerate(results[modes[0]]["sweep"]):
        s = [results[m]["sweep"][i]["summary"] for m in modes]
        cells = [f"{x['completed']}/{x['num_requests']}" for x in s]
        cells += [f"{x['goodput']:.2f}" for x in s] + [f"{x['slo_attainment']:.2f}" for x in s]
        cells += [f"{_f(x['ttft_ms']['p50'], 0)} / {_f(x['ttft_ms']['p99'], 0)}" for x in s]
        cells += [f"{_f(x['tpot_ms']['p50'])} / {_f(x['tpot_ms']['p99'])}" for x in s]
        lines.append(f"| {rate['rate']:g} | " + " | ".join(cells) + " |")
    splits = {m: r["handoff_split"] for m, r in results.items() if "handoff_split" in r}
    if splits:
        both = len(splits) == 2
        columns = [*splits, "difference"] if both else list(splits)
        lines += ["", "| handoff run, 1 in flight (mean ms) | " + " | ".join(columns) + " |",
                  "|---|" + "---|" * len(columns)]

        def row(label: str, values: list[float | None]) -> str:
            cells = [_f(v) for v in values]
            if both:
                cells.append(_f(None if None in values else values[0] - values[1]))
            return f"| {label} | " + " | ".join(cells) + " |"

        for label, key in [("client TTFT", "client_ttft_ms"), ("· its median", "client_ttft_p50_ms"),
                           ("gateway TTFT", "gateway_ttft_ms"), ("client first ITL", "client_first_itl_ms"),
                           ("· its median", "client_first_itl_p50_ms"), ("gateway first ITL", "gateway_first_itl_ms")]:
            lines.append(row(label, [s[key] for s in splits.values()]))
        for part in ("ttft_parts", "first_itl_parts"):
            for name in dict.fromkeys(n for s in splits.values() for n in s[part]):
                values = [s[part].get(name) for s in splits.values()]
                lines.append(row(f"{part.removesuffix('_parts')}: {name}", values))
        for mode, s in splits.items():
            lines.append(f"\n{mode}: not exposed by the gateway: {', '.join(s['missing']) or 'nothing'}")
    return "\n".join(lines) + "\n"


COLORS = {"disagg": "tab:blue", "colocated": "tab:orange"}
PART_COLORS = ("tab:green", "tab:purple", "tab:red", "tab:brown", "tab:cyan")


def plot_sweep(results: dict[str, dict], config: EvalConfig, path: Path) -> None:
    """Goodput, SLO attainment, TTFT and TPOT percentiles against the rate; one colour per configuration."""
    from matplotlib.figure import Figure  # matplotlib only when writing figures

    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2)
    panels = [("goodput (req/s)", "goodput", None), ("SLO attainment", "slo_attainment", None),
              ("TTFT p50 (dashed) / p99 (ms)", "ttft_ms", config.slo_ttft_ms),
              ("TPOT p50 (dashed) / p99 (ms)", "tpot_ms", config.slo_tpot_ms)]
    for ax, (title, key, slo) in zip(axes.flat, panels):
        for mode, r in results.items():
            rates = [run["rate"] for run in r["sweep"]]
            values = [run["summary"][key] for run in r["sweep"]]
            if isinstance(values[0], dict):
                ax.plot(rates, [_nan(v["p50"]) for v in values], "o--", color=COLORS[mode])
                values = [v["p99"] for v in values]
            ax.plot(rates, [_nan(v) for v in values], "o-", color=COLORS[mode], label=mode)
        if slo is not None:
            ax.axhline(slo, color="grey", linewidth=0.8, label="SLO")
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{config.tag}: {config.input_len} tokens ±{config.range_ratio:.0%} in, {config.output_len} out; "
                 f"SLO TTFT {config.slo_ttft_ms:g} ms, TPOT {config.slo_tpot_ms:g} ms")
    fig.savefig(path, dpi=70)


def plot_handoff(splits: dict[str, dict], path: Path) -> None:
    """Stacked components of TTFT and of the first inter-token gap; grey: what no histogram explains."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.5), layout="constrained")
    for ax, part, title in zip(fig.subplots(1, 2), ("ttft", "first_itl"), ("TTFT", "first inter-token gap")):
        names = list(dict.fromkeys(n for s in splits.values() for n in s[f"{part}_parts"]))
        labelled: set[str] = set()
        for x, s in enumerate(splits.values()):
            bottom = 0.0
            bars = [(n, v, PART_COLORS[names.index(n) % len(PART_COLORS)]) for n, v in s[f"{part}_parts"].items()]
            total = s[f"client_{part}_ms"]
            if total is not None and total > bottom + sum(v for _, v, _ in bars if v is not None):
                bars.append(("not exposed", total - sum(v for _, v, _ in bars if v is not None), "lightgrey"))
            for name, v, color in bars:
                if v is None:
                    continue
                ax.bar(x, v, bottom=bottom, color=color, label=None if name in labelled else name)
                labelled.add(name)
                bottom += v
        ax.set_xticks(range(len(splits)), list(splits))
        ax.set_ylabel("ms (mean; bar top = client-measured)")
        ax.set_title(f"{title}, 1 request in flight")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=70)


def _nan(v: float | None) -> float:
    return math.nan if v is None else v


def environment() -> dict:
    out = {"python": platform.python_version(), "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    try:
        import torch

        out["torch"] = torch.__version__
        if torch.cuda.is_available():
            out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return out


def run(config: EvalConfig) -> dict:
    model = config.model_dir()
    work = Path(config.work_dir) / config.tag
    out = Path(config.out_dir) if config.out_dir else work
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"tool": "bench.eval_pd", "config": asdict(config), "model_dir": model, "environment": environment()}
    results: dict[str, dict] = {}
    started = time.monotonic()
    failed: dict[str, str] = {}
    for mode in config.modes:
        try:
            results[mode] = measure(config, mode, model, work)
        except EvalError as e:  # recorded; the other configurations still run
            log.error("%s", e)
            failed[mode] = str(e)
            continue
        if "handoff" in results[mode]:
            results[mode]["handoff_split"] = handoff_split(results[mode])
    checks = [r["check"] for r in results.values() if "check" in r]
    if len(checks) > 1:
        doc["greedy_agree"] = checks_agree(checks)
    doc["wall_s"] = time.monotonic() - started
    doc["environment"]["loadavg_end"] = os.getloadavg()
    doc["results"], doc["failed"] = results, failed
    (out / f"{config.tag}.json").write_text(json.dumps(doc, indent=1, default=str))
    if not results:
        raise EvalError(f"no configuration could be measured: {failed}")
    md = tables(results)
    (out / f"{config.tag}.md").write_text(md)
    print(md)
    plot_sweep(results, config, out / f"{config.tag}_sweep.png")
    splits = {m: r["handoff_split"] for m, r in results.items() if "handoff_split" in r}
    if splits:
        plot_handoff(splits, out / f"{config.tag}_handoff.png")
    print(f"wrote {out}/{config.tag}.json, .md and PNGs")
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.eval_pd", description=__doc__.split("\n\n")[0])
    add_arguments(parser, EvalConfig)
    try:
        config = from_args(EvalConfig, parser.parse_args(argv))
    except ConfigError as e:
        print(f"eval_pd: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`: stop the stack on the way out
    try:
        run(config)
    except EvalError as e:
        print(f"eval_pd: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
