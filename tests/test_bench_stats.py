"""Statistics of bench.serving_stats on synthetic timings with hand-computed answers."""

import random

import numpy as np
import pytest

from bench.serving_stats import (
    RequestRecord,
    chunk_times,
    meets_slo,
    metric_stats,
    percentile,
    summarize,
    throughput_timeline,
)


def ok(index, ttft, gaps, output_tokens, prompt_tokens=10, start=0.0):
    """A successful request whose stream ended at its last chunk."""
    return RequestRecord(index, start, prompt_tokens, output_tokens, ttft, ttft + sum(gaps), list(gaps))


def failed(index, kind):
    return RequestRecord(index, 0.0, 10, error=kind)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101])
@pytest.mark.parametrize("q", [0, 1, 50, 90, 99, 100, 37.5])
def test_percentile_matches_numpy_linear(n, q):
    values = [random.Random(n * 7 + i).uniform(0, 100) for i in range(n)]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_rejects_bad_input():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_tpot_excludes_first_token():
    # first token at 100 ms, then 4 more tokens until 500 ms: (500 - 100) / (5 - 1) = 100 ms
    r = RequestRecord(0, 0.0, 10, output_tokens=5, ttft_s=0.1, e2e_s=0.5)
    assert r.tpot_s == pytest.approx(0.1)
    assert RequestRecord(1, 0.0, 10, output_tokens=1, ttft_s=0.1, e2e_s=0.1).tpot_s is None
    assert failed(2, "timeout").tpot_s is None


def test_itl_collects_every_gap_and_chunk_times():
    a = ok(0, 0.2, [0.01, 0.03], 3, start=1.0)
    b = ok(1, 0.1, [0.05], 2)
    s = summarize([a, b], duration_s=2.0)
    gaps_ms = [10, 30, 50]
    assert s["itl_ms"]["count"] == 3
    assert s["itl_ms"]["mean"] == pytest.approx(30)
    assert s["itl_ms"]["p50"] == pytest.approx(30)
    assert s["itl_ms"]["p90"] == pytest.approx(np.percentile(gaps_ms, 90))
    assert chunk_times(a) == pytest.approx([1.2, 1.21, 1.24])


def test_summary_throughput_and_latency():
    records = [ok(0, 0.1, [0.1] * 4, 5, prompt_tokens=100), ok(1, 0.3, [0.2] * 9, 10, prompt_tokens=50)]
    s = summarize(records, duration_s=4.0)
    assert (s["completed"], s["failed"], s["num_requests"]) == (2, 0, 2)
    assert s["total_input_tokens"] == 150 and s["total_output_tokens"] == 15
    assert s["request_throughput"] == pytest.approx(0.5)
    assert s["input_throughput"] == pytest.approx(37.5)
    assert s["output_throughput"] == pytest.approx(3.75)
    assert s["total_token_throughput"] == pytest.approx(41.25)
    assert s["ttft_ms"]["mean"] == pytest.approx(200)
    assert s["ttft_ms"]["p50"] == pytest.approx(200)
    assert s["ttft_ms"]["p99"] == pytest.approx(100 + 200 * 0.99)
    assert s["tpot_ms"]["mean"] == pytest.approx(150)  # 100 ms and 200 ms
    assert s["e2e_ms"]["max"] == pytest.approx(2100)
    assert s["e2e_ms"]["min"] == pytest.approx(500)


def test_goodput_and_attainment_with_failures():
    records = [
        ok(0, 0.05, [0.01] * 3, 4),  # ttft 50, tpot 10: meets both
        ok(1, 0.30, [0.01] * 3, 4),  # ttft 300: misses TTFT
        ok(2, 0.05, [0.05] * 3, 4),  # tpot 50: misses TPOT
        ok(3, 0.05, [], 1),  # one token: TPOT undefined, passes
        failed(4, "http_500"),
        failed(5, "http_500"),
        failed(6, "timeout"),
        ok(7, 0.125, [0.03125], 2),  # exactly at both SLOs (binary-exact times)
    ]
    s = summarize(records, duration_s=2.0, slo_ttft_ms=125, slo_tpot_ms=31.25)
    assert s["good_requests"] == 3
    assert s["goodput"] == pytest.approx(1.5)
    assert s["slo_attainment"] == pytest.approx(3 / 8)
    assert s["errors"] == {"http_500": 2, "timeout": 1}
    assert (s["completed"], s["failed"]) == (5, 3)
    assert s["ttft_ms"]["count"] == 5  # failures are not in the latency stats


def test_unset_slos_always_pass_but_failures_never_do():
    records = [ok(0, 5.0, [3.0], 2), failed(1, "connect_error")]
    s = summarize(records, duration_s=10.0)
    assert s["good_requests"] == 1 and s["slo_attainment"] == pytest.approx(0.5)
    assert meets_slo(records[0], None, 1.0) is False  # tpot 3000 ms
    assert meets_slo(records[0], 1.0, None) is False  # ttft 5000 ms
    assert meets_slo(records[1], None, None) is False


def test_empty_metric_and_bad_duration():
    assert metric_stats([]) == {"count": 0, "mean": None, "min": None, "max": None, "p50": None, "p90": None, "p99": None}
    with pytest.raises(ValueError):
        summarize([], duration_s=0)


def test_throughput_timeline_spreads_tokens_over_chunks():
    # 2 chunks at 0.5 s and 1.5 s carrying 10 tokens -> 5 tokens in each 1 s bin
    a = ok(0, 0.5, [1.0], 10)
    b = ok(1, 0.2, [], 3, start=2.0)  # one chunk at 2.2 s with 3 tokens
    times, rates = throughput_timeline([a, b, failed(2, "timeout")], bin_s=1.0)
    assert times == [0.0, 1.0, 2.0]
    assert rates == pytest.approx([5.0, 5.0, 3.0])
    times, rates = throughput_timeline([a], bin_s=0.5)
    assert rates == pytest.approx([0.0, 10.0, 0.0, 10.0])
    assert throughput_timeline([failed(0, "timeout")], 1.0) == ([], [])
