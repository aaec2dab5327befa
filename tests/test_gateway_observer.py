"""``GatewayMetrics`` as the flow's ``FlowObserver``: which reported moment feeds which metric."""

from __future__ import annotations

import time

from services.gateway.flow import ChoiceStats
from services.gateway.metrics import GatewayMetrics


def sample(metrics: GatewayMetrics, name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


def test_request_done_counts_every_status_and_times_only_answered_requests():
    m = GatewayMetrics()
    m.on_request_done("/v1/completions", 503, 0.2, ())
    assert sample(m, "pdserve_gateway_requests_total", {"endpoint": "/v1/completions", "status": "503"}) == 1
    assert sample(m, "pdserve_gateway_e2e_seconds_count") == 0
    first_token_at = time.perf_counter() - 0.3
    choices = [ChoiceStats(completion_tokens=4, first_token_at=first_token_at), ChoiceStats(completion_tokens=1)]
    m.on_request_done("/v1/completions", 200, 0.5, choices)
    assert sample(m, "pdserve_gateway_requests_total", {"endpoint": "/v1/completions", "status": "200"}) == 1
    assert sample(m, "pdserve_gateway_e2e_seconds_sum") == 0.5
    assert sample(m, "pdserve_gateway_tpot_seconds_count") == 1  # one token after the first: no time per token
    assert sample(m, "pdserve_gateway_tpot_seconds_sum") >= 0.1


def test_leg_moments_feed_their_histograms_and_engine_timings_only_when_reported():
    m = GatewayMetrics()
    m.on_first_leg_token(0.01)
    m.on_prefill_timings({"queue_s": 0.002})
    m.on_decode_dispatch(0.001)
    m.on_decode_first_output(0.02, {"kv_transfer_s": 0.004, "kv_bytes": 4096.0})
    m.on_first_token(0.015)
    m.on_second_token(0.03)
    m.on_leg_retry("prefill")
    m.on_abort("decode")
    for name, value in (("prefill_leg", 0.01), ("prefill_queue", 0.002), ("decode_dispatch", 0.001),
                        ("decode_first_output", 0.02), ("kv_transfer", 0.004), ("ttft", 0.015),
                        ("first_itl", 0.03)):
        assert sample(m, f"pdserve_gateway_{name}_seconds_sum") == value, name
    assert sample(m, "pdserve_gateway_kv_transfer_bytes_sum") == 4096.0
    assert sample(m, "pdserve_gateway_prefill_seconds_count") == 0  # no prefill_s reported
    assert sample(m, "pdserve_gateway_first_decode_step_seconds_count") == 0
    assert sample(m, "pdserve_gateway_leg_retries_total", {"role": "prefill"}) == 1
    assert sample(m, "pdserve_gateway_aborts_total", {"role": "decode"}) == 1
