"""Statistics of a serving benchmark run, computed from per-request client timings.

Definitions (all measured by the client, times in seconds, reported in ms):

- TTFT: request sent -> first chunk carrying an output token (its text may be empty;
  see ``bench.stream_tokens``).
- ITL: every gap between two consecutive token-bearing chunks of one request.
- TPOT: per request ``(e2e - ttft) / (output_tokens - 1)``: the first token is
  excluded; undefined (``None``) for requests with fewer than two output tokens.
- E2E: request sent -> end of the stream.
- Goodput: successful requests meeting BOTH SLOs per second of the run; an unset
  SLO always passes, an undefined TPOT passes the TPOT SLO, failed requests never count.
- SLO attainment: those good requests / all requests sent (failures count as misses).
- Throughputs count successful requests and their tokens over the run's duration.
- Measured prompt length: the server's own count (``usage.prompt_tokens``, special and
  template tokens included) of every request that reported one.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

PERCENTILES = (50, 90, 99)


@dataclass(slots=True)
class RequestRecord:
    """What the client saw of one request; ``error`` is ``None`` when it succeeded."""

    index: int
    start_s: float  # send time, relative to the start of the run
    prompt_tokens: int  # the dataset's count until the server reports its own
    output_tokens: int = 0
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens_source: str = "chunks"  # "usage" when the server reported it
    prompt_tokens_source: str = "dataset"  # "usage" when the server reported it
    error: str | None = None  # kind: "http_500", "timeout", "connect_error", "truncated_stream", ...
    error_detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.ttft_s is None or self.e2e_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self) -> dict:
        out = asdict(self)
        out["tpot_s"] = self.tpot_s
        return out


@dataclass(slots=True)
class Run:
    """One run at one request rate."""

    rate: float
    records: list[RequestRecord]
    summary: dict

    def to_json(self) -> dict:
        return {"request_rate": self.rate, "summary": self.summary, "requests": [r.to_json() for r in self.records]}


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile with linear interpolation (numpy's default method)."""
    if not values:
        raise ValueError("percentile of an empty list")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q={q} is outside [0, 100]")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def metric_stats(values_s: list[float]) -> dict[str, float | int | None]:
    """count, mean, min, max and p50/p90/p99 of ``values_s`` (seconds) in milliseconds."""
    out: dict[str, float | int | None] = {"count": len(values_s)}
    if not values_s:
        out.update(mean=None, min=None, max=None, **{f"p{q}": None for q in PERCENTILES})
        return out
    ms = [v * 1000 for v in values_s]
    out.update(mean=sum(ms) / len(ms), min=min(ms), max=max(ms))
    out.update({f"p{q}": percentile(ms, q) for q in PERCENTILES})
    return out


def meets_slo(record: RequestRecord, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    """Whether a request succeeded and met both SLOs (an unset SLO always passes)."""
    if not record.ok:
        return False
    if slo_ttft_ms is not None and (record.ttft_s is None or record.ttft_s * 1000 > slo_ttft_ms):
        return False
    tpot = record.tpot_s
    if slo_tpot_ms is not None and tpot is not None and tpot * 1000 > slo_tpot_ms:
        return False
    return True


def summarize(
    records: list[RequestRecord],
    duration_s: float,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
) -> dict:
    """Every aggregate of one run (see the module docstring for the definitions)."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    done = [r for r in records if r.ok]
    good = sum(meets_slo(r, slo_ttft_ms, slo_tpot_ms) for r in records)
    input_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    return {
        "num_requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "input_throughput": input_tokens / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "slo_ttft_ms": slo_ttft_ms,
        "slo_tpot_ms": slo_tpot_ms,
        "good_requests": good,
        "goodput": good / duration_s,
        "slo_attainment": good / len(records) if records else 0.0,
        "ttft_ms": metric_stats([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_ms": metric_stats([t for r in done if (t := r.tpot_s) is not None]),
        "itl_ms": metric_stats([gap for r in done for gap in r.itl_s]),
        "e2e_ms": metric_stats([r.e2e_s for r in done if r.e2e_s is not None]),
        "errors": dict(Counter(r.error for r in records if r.error is not None)),
        "measured_prompt_len": count_stats([r.prompt_tokens for r in records if r.prompt_tokens_source == "usage"]),
    }


def count_stats(values: list[int]) -> dict[str, float | int | None]:
    """count, mean, min and max of ``values`` (None but the count when there are none)."""
    if not values:
        return {"count": 0, "mean": None, "min": None, "max": None}
    return {"count": len(values), "mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def chunk_times(record: RequestRecord) -> list[float]:
    """Arrival times of a request's token-bearing chunks, relative to the start of the run."""
    if record.ttft_s is None:
        return []
    times = [record.start_s + record.ttft_s]
    for gap in record.itl_s:
        times.append(times[-1] + gap)
    return times


def throughput_timeline(records: list[RequestRecord], bin_s: float) -> tuple[list[float], list[float]]:
    """Output tokens/s of successful requests in consecutive bins of ``bin_s`` seconds.

    Returns (bin start times, tokens/s).  A request's tokens are spread evenly
    over its token-bearing chunks, since a chunk may carry several tokens.
    """
    if bin_s <= 0:
        raise ValueError(f"bin_s must be > 0, got {bin_s}")
    events = []
    for r in records:
        times = chunk_times(r) if r.ok else []
        events += [(t, r.output_tokens / len(times)) for t in times]
    if not events:
        return [], []
    num_bins = int(max(t for t, _ in events) // bin_s) + 1
    tokens = [0.0] * num_bins
    for t, n in events:
        tokens[int(t // bin_s)] += n
    return [i * bin_s for i in range(num_bins)], [n / bin_s for n in tokens]
