"""What ``pdserve bench`` prints: a table per run, a line per rate of a sweep, the prompt lengths
asked for against the server's count, and why the benchmark failed when too many requests did."""

from __future__ import annotations

import json

from bench.datasets import EXACT, Dataset
from bench.serving_stats import Run


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_run(title: str, rate: float, s: dict) -> str:
    """One run's summary as an aligned plain-text table."""
    rows = [
        ("Request rate (req/s)", f"{rate:g}"),
        ("Successful requests", s["completed"]),
        ("Failed requests", s["failed"]),
        ("Duration (s)", s["duration_s"]),
        ("Total input tokens", s["total_input_tokens"]),
        ("Mean input tokens (server)", s["measured_prompt_len"]["mean"]),
        ("Total output tokens", s["total_output_tokens"]),
        ("Request throughput (req/s)", s["request_throughput"]),
        ("Input token throughput (tok/s)", s["input_throughput"]),
        ("Output token throughput (tok/s)", s["output_throughput"]),
        ("SLO TTFT (ms)", s["slo_ttft_ms"]),
        ("SLO TPOT (ms)", s["slo_tpot_ms"]),
        ("Goodput (req/s)", s["goodput"]),
        ("SLO attainment", s["slo_attainment"]),
    ]
    for metric in ("ttft", "tpot", "itl", "e2e"):
        stats = s[f"{metric}_ms"]
        for key in ("mean", "p50", "p90", "p99"):
            rows.append((f"{key} {metric.upper()} (ms)", stats[key]))
    for kind, count in sorted(s["errors"].items()):
        rows.append((f"errors: {kind}", count))
    width = max(len(name) for name, _ in rows) + 2
    lines = [f"{name:<{width}}{_fmt(value):>14}" for name, value in rows]
    rule = "=" * (width + 14)
    return "\n".join([f" {title} ".center(width + 14, "="), *lines, rule])


def format_sweep(runs: list[Run]) -> str:
    """One aligned line per rate of a sweep."""
    header = ("rate", "ok", "failed", "req/s", "goodput", "attain", "p99 TTFT", "p99 TPOT", "p99 ITL")
    rows = [header]
    for run in runs:
        s = run.summary
        rows.append((f"{run.rate:g}", str(s["completed"]), str(s["failed"]), _fmt(s["request_throughput"]),
                     _fmt(s["goodput"]), _fmt(s["slo_attainment"]), _fmt(s["ttft_ms"]["p99"]),
                     _fmt(s["tpot_ms"]["p99"]), _fmt(s["itl_ms"]["p99"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def measured_mean_prompt_len(runs: list[Run]) -> float | None:
    """The server's mean prompt length over every request of every run that reported one."""
    counts = [r.prompt_tokens for run in runs for r in run.records if r.prompt_tokens_source == "usage"]
    return sum(counts) / len(counts) if counts else None


def length_report(dataset: Dataset, runs: list[Run]) -> str:
    """The prompt length asked for against the server's count; a warning when the lengths were approximate."""
    measured = measured_mean_prompt_len(runs)
    asked = dataset.describe()
    counted = ("the server reported no prompt length" if measured is None
               else f"the server counted {measured:.1f} tokens on average")
    if dataset.length_method == EXACT:
        return (f"prompt length: {asked['mean_prompt_len']:.1f} tokens by {dataset.tokenizer} (without special "
                f"tokens); {counted}")
    return (f"WARNING: APPROXIMATE prompt lengths: {asked['mean_prompt_words']:.1f} words per prompt, {counted}; "
            "pass --tokenizer for exact lengths")


def error_message(detail: str) -> str:
    """The ``error.message`` of an OpenAI-style error body, else ``detail`` itself."""
    try:
        error = json.loads(detail).get("error")
    except (ValueError, AttributeError):
        return detail
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    return detail if error is None else str(error)


def failure_report(runs: list[Run], max_failure_ratio: float) -> str | None:
    """Why the benchmark failed: the first run where more than ``--max-failure-ratio`` of the requests
    failed, with its first failure's message; None when no run did."""
    for run in runs:
        s = run.summary
        if s["failed"] > max_failure_ratio * s["num_requests"]:
            first = min((r for r in run.records if not r.ok), key=lambda r: r.start_s)
            return (f"{s['failed']} of {s['num_requests']} requests failed at rate {run.rate:g} (more than "
                    f"--max-failure-ratio {max_failure_ratio:g}); the first: {first.error}: "
                    f"{error_message(first.error_detail)}")
    return None
