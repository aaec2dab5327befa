"""Prometheus metrics of one gateway, in its own ``CollectorRegistry``.

Per request: a counter by endpoint and HTTP status, and histograms of TTFT,
time per output token, end-to-end latency, prefill queue and compute time (the
prefill engine's ``timings["queue_s"]`` / ``["prefill_s"]``), the prefill leg
as the gateway sees it (Generate sent to first token received), decode's first
output as the gateway sees it, and decode's own split of that: KV transfer time
and bytes and the first decode step (``timings["kv_transfer_s"]`` /
``["kv_bytes"]`` / ``["first_decode_step_s"]`` on its first output).  TTFT
minus the prefill leg is the gateway's own share of TTFT.
Per choice, what vLLM users graph: prompt and generation tokens, and finished
choices by finish reason (``stop``, ``length``; ``abort`` for one cut short by
an error, a disconnect or shutdown).
Per instance, from registry heartbeats: running and waiting requests, KV blocks
used, total and pinned for transfer, and the KV usage ratio (used / total),
labelled by instance id and role.

``GatewayMetrics`` is the flow's ``FlowObserver``: the flow reports moments
(``on_first_token``, ``on_request_done``...), and only this module knows which
metric each one feeds.

The per-request metrics live in ``registry``, the per-instance gauges in
``instances_registry``: with worker processes (``worker_metrics``) the first are
each worker's own, the second the same in every worker.

The per-request histograms are ``LoopHistogram``s and the per-request counters
``LoopCounter``s: a request observes about a dozen histograms and four counters,
and prometheus_client's ``Histogram`` and ``Counter`` take a lock (the histogram
also walks its buckets in Python) on every observation, a measurable share of a
request's cost.  (So those counters have no ``_created`` series.)
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import TYPE_CHECKING, Iterator, Sequence

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from common.messages import Instance, Load, Role

if TYPE_CHECKING:
    from services.gateway.context import ChoiceTiming

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BYTES_BUCKETS = tuple(float(1 << k) for k in range(10, 36, 2))
LOAD_FIELDS = tuple(Load.__struct_fields__)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class LoopHistogram:
    """An unlabelled Prometheus histogram observed from one thread (the event loop's).

    ``observe`` is a bisect and two additions, without locks; the registry
    collects it (``collect``) as the usual ``_bucket``/``_count``/``_sum`` series.
    A scrape from another thread may see an observation's count without its sum.
    """

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry):
        self.name = name
        self.documentation = documentation
        self._bounds = sorted(float(b) for b in buckets)
        self._les = [floatToGoString(b) for b in self._bounds] + ["+Inf"]
        self._counts = [0] * (len(self._bounds) + 1)  # the last one: above every bound
        self._sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative, buckets = 0, []
        for le, count in zip(self._les, list(self._counts)):
            cumulative += count
            buckets.append((le, cumulative))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=self._sum)


class LoopCounter:
    """A Prometheus counter observed from one thread (the event loop's), by label values.

    ``inc(labels, amount)`` is a dict update, without locks; the registry collects
    it (``collect``) as the usual ``_total`` series, one per label values seen (an unlabelled one from 0).
    """

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...], registry: CollectorRegistry):
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.values: dict[tuple[str, ...], float] = {} if labelnames else {(): 0}
        registry.register(self)

    def inc(self, labels: tuple[str, ...] = (), amount: float = 1) -> None:
        values = self.values
        values[labels] = values.get(labels, 0) + amount

    def describe(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in list(self.values.items()):
            family.add_metric(labels, value)
        yield family


class GatewayMetrics:
    """The gateway's Prometheus metrics; a ``FlowObserver``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = LoopCounter("pdserve_gateway_requests", "HTTP requests by endpoint and status",
                                    ("endpoint", "status"), r)
        self.in_flight = Gauge("pdserve_gateway_requests_in_flight", "generation requests being served",
                               registry=r)
        self.queued = Gauge("pdserve_gateway_requests_queued", "generation requests waiting for a slot", registry=r)
        self.retries = Counter("pdserve_gateway_leg_retries", "legs retried on another instance",
                               ["role"], registry=r)
        self.aborts = Counter("pdserve_gateway_aborts", "Abort messages sent to engines", ["role"], registry=r)
        self.prefills_on_decode = Counter("pdserve_gateway_prefills_on_decode", "disaggregated requests whose prompt "
                                          "a decode instance computed (--local-prefill-queue)", registry=r)
        def latency(name: str, documentation: str) -> LoopHistogram:
            return LoopHistogram(f"pdserve_gateway_{name}_seconds", documentation, LATENCY_BUCKETS, r)

        self.ttft = latency("ttft", "time to first token of a choice")
        self.tpot = latency("tpot", "time per output token after the first")
        self.e2e = latency("e2e", "end-to-end latency of a request")
        self.prefill = latency("prefill", "prefill engine's prefill time")
        self.prefill_queue = latency("prefill_queue", "prefill (or colocated) engine's queue time: arrival to "
                                     "first scheduled")
        self.prefill_leg = latency("prefill_leg", "gateway-measured: prefill Generate sent to its first token "
                                   "received")
        self.first_itl = latency("first_itl", "gap between a choice's first and second token events "
                                 "(P/D: the handoff)")
        self.decode_dispatch = latency("decode_dispatch", "gateway: prefill's first token received (and sent on) "
                                       "to decode Generate sent")
        self.decode_first_output = latency("decode_first_output", "gateway-measured: decode Generate sent to "
                                           "decode's first output")
        self.first_decode_step = latency("first_decode_step", "decode engine: end of the KV read to its first output")
        self.kv_transfer = latency("kv_transfer", "KV transfer time reported by decode")
        self.kv_bytes = LoopHistogram("pdserve_gateway_kv_transfer_bytes", "KV bytes read by decode",
                                  buckets=BYTES_BUCKETS, registry=r)
        self.prompt_tokens = LoopCounter("pdserve_gateway_prompt_tokens", "prompt tokens of each choice (each "
                                         "runs its prompt), counted when its request ends", (), r)
        self.generation_tokens = LoopCounter("pdserve_gateway_generation_tokens", "tokens generated, counted when "
                                             "their request ends", (), r)
        self.finished = LoopCounter("pdserve_gateway_request_success", "choices by finish reason (abort: cut short)",
                                    ("finished_reason",), r)
        self.instances_registry = CollectorRegistry()
        self.load = {
            name: Gauge(f"pdserve_instance_{name}", f"{name} from the instance's last heartbeat",
                        ["instance", "role"], registry=self.instances_registry)
            for name in LOAD_FIELDS
        }
        self.kv_usage = Gauge("pdserve_instance_kv_usage_ratio", "KV blocks used / total (0..1) from the "
                              "instance's last heartbeat", ["instance", "role"], registry=self.instances_registry)

    # -- FlowObserver ----------------------------------------------------------

    def on_leg_retry(self, role: Role) -> None:
        self.retries.labels(role).inc()

    def on_abort(self, role: Role) -> None:
        self.aborts.labels(role).inc()

    def on_prefill_on_decode(self) -> None:
        self.prefills_on_decode.inc()

    def on_first_leg_token(self, elapsed: float) -> None:
        self.prefill_leg.observe(elapsed)

    def on_prefill_timings(self, timings: dict[str, float]) -> None:
        if "queue_s" in timings:
            self.prefill_queue.observe(timings["queue_s"])
        if "prefill_s" in timings:
            self.prefill.observe(timings["prefill_s"])

    def on_decode_dispatch(self, elapsed: float) -> None:
        self.decode_dispatch.observe(elapsed)

    def on_decode_first_output(self, elapsed: float, timings: dict[str, float]) -> None:
        self.decode_first_output.observe(elapsed)
        for key, histogram in (("kv_transfer_s", self.kv_transfer), ("kv_bytes", self.kv_bytes),
                               ("first_decode_step_s", self.first_decode_step)):
            if key in timings:
                histogram.observe(timings[key])

    def on_first_token(self, since_request: float) -> None:
        self.ttft.observe(since_request)

    def on_second_token(self, gap: float) -> None:
        self.first_itl.observe(gap)

    def on_request_done(self, endpoint: str, status: int, elapsed: float, choices: Sequence[ChoiceTiming]) -> None:
        """Counted by endpoint and status, each choice's tokens and finish reason; a 200 also observes its
        latency and each choice's time per token."""
        self.requests.inc((endpoint, str(status)))
        for c in choices:
            self.prompt_tokens.inc((), c.prompt_tokens)
            self.generation_tokens.inc((), c.completion_tokens)
            self.finished.inc((c.finish_reason or "abort",))
        if status != 200:
            return
        self.e2e.observe(elapsed)
        end = time.perf_counter()
        for c in choices:
            if c.first_token_at is not None and c.completion_tokens > 1:
                self.tpot.observe((end - c.first_token_at) / (c.completion_tokens - 1))

    # -- per instance ----------------------------------------------------------

    def observe_instance(self, inst: Instance) -> None:
        for name, gauge in self.load.items():
            gauge.labels(inst.id, inst.role).set(getattr(inst.load, name))
        total = inst.load.kv_blocks_total
        self.kv_usage.labels(inst.id, inst.role).set(inst.load.kv_blocks_used / total if total else 0.0)

    def forget_instance(self, inst: Instance) -> None:
        for gauge in (*self.load.values(), self.kv_usage):
            try:
                gauge.remove(inst.id, inst.role)
            except KeyError:
                pass

    def render(self) -> bytes:
        return generate_latest(self.registry) + generate_latest(self.instances_registry)

    def snapshot(self) -> bytes:
        """The per-request families as msgpack: ``[name, documentation, type, [[sample, labels, value]...]]``
        each (``worker_metrics`` merges the workers' snapshots)."""
        return msgspec.msgpack.encode([(m.name, m.documentation, m.type, [(s.name, s.labels, s.value)
                                                                          for s in m.samples])
                                       for m in self.registry.collect()])
