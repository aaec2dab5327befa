"""PNG figures of benchmark results (matplotlib's Agg canvas, no display needed)."""

from __future__ import annotations

import math

from matplotlib.figure import Figure

from bench.serving_stats import RequestRecord, throughput_timeline

TIMELINE_BINS = 50


def _cdf(ax, values_ms: list[float], title: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of samples")
    ax.grid(alpha=0.3)
    if not values_ms:
        ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        return
    ordered = sorted(values_ms)
    n = len(ordered)
    ax.step(ordered, [(i + 1) / n for i in range(n)], where="post")
    ax.set_ylim(0, 1.02)


def plot_latency(records: list[RequestRecord], path: str, title: str = "") -> None:
    """Write CDFs of TTFT, TPOT, ITL and E2E of the successful requests and output tokens/s over time."""
    done = [r for r in records if r.ok]
    fig = Figure(figsize=(12, 10), layout="constrained")
    grid = fig.add_gridspec(3, 2)
    series = {
        "TTFT": [r.ttft_s * 1000 for r in done if r.ttft_s is not None],
        "TPOT": [t * 1000 for r in done if (t := r.tpot_s) is not None],
        "ITL": [gap * 1000 for r in done for gap in r.itl_s],
        "E2E latency": [r.e2e_s * 1000 for r in done if r.e2e_s is not None],
    }
    for i, (name, values) in enumerate(series.items()):
        _cdf(fig.add_subplot(grid[i // 2, i % 2]), values, f"{name} CDF")
    ax = fig.add_subplot(grid[2, :])
    end = max((r.start_s + (r.e2e_s or 0.0) for r in done), default=0.0)
    times, rates = throughput_timeline(records, max(end, 1e-3) / TIMELINE_BINS)
    ax.step(times, rates, where="post")
    ax.set_title("output throughput over time")
    ax.set_xlabel("s since start")
    ax.set_ylabel("tokens/s")
    ax.grid(alpha=0.3)
    fig.suptitle(f"{title} ({len(done)}/{len(records)} requests ok)")
    fig.savefig(path, dpi=100)


def plot_sweep(rates: list[float], summaries: list[dict], path: str) -> None:
    """Write goodput and p99 TPOT against request rate; an ``inf`` rate is drawn right of the others."""
    finite = [r for r in rates if math.isfinite(r)]
    inf_x = max(finite, default=1.0) * 1.25
    xs = [r if math.isfinite(r) else inf_x for r in rates]
    fig = Figure(figsize=(12, 5), layout="constrained")
    panels = [
        ("goodput (req/s)", [s["goodput"] for s in summaries]),
        ("p99 TPOT (ms)", [s["tpot_ms"]["p99"] for s in summaries]),
    ]
    for i, (label, ys) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        points = [(x, y) for x, y in zip(xs, ys) if y is not None]
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o")
        ax.set_xticks(xs, [f"{r:g}" for r in rates])
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs request rate")
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
