"""The gateway's configuration: flags, environment variables, validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.bus.curve import BusSecurity
from common.config import opt, require
from common.discovery import url_problem

Mode = Literal["auto", "disagg", "colocated"]
Policy = Literal["round_robin", "least_loaded"]


@dataclass(slots=True)
class GatewayConfig(BusSecurity):
    host: str = opt("127.0.0.1", "HTTP address to listen on")
    port: int = opt(8000, "HTTP port (0 picks a free one)")
    workers: int = opt(1, "gateway processes serving the port, each with its own registry watch and engine "
                       "clients (SO_REUSEPORT); one that exits is restarted")
    registry: str = opt("tcp://127.0.0.1:7100", "discovery to watch: the registry's tcp://host:port, "
                        "or etcd://host:port[,host:port...]")
    mode: Mode = opt("auto", "disagg: prefill then decode; colocated: one 'both' instance; "
                     "auto: disagg when prefill and decode instances exist, else colocated")
    kv_mode: Literal["auto", "read", "push"] = opt(
        "auto", "how a disaggregated request's KV moves (the engines' --kv-mode): read: prefill first, then decode "
        "reads the KV; push: decode first pre-allocates the blocks, then prefill writes into them; auto: as the "
        "model's engines advertise (a forced mode they do not run answers 503)", choices=("auto", "read", "push"))
    prefill_policy: Policy = opt("least_loaded", "how a prefill instance is picked")
    decode_policy: Policy = opt("least_loaded", "how a decode instance is picked")
    local_prefill_queue: int = opt(
        0, "conditional disaggregation: while every prefill instance of a model has this many prefill legs from "
        "this gateway in flight, a new request computes its prompt on a decode instance instead (one leg, no KV "
        "transfer), at most this many such prompts per decode instance at once; 0: always prefill on prefill")
    max_retries: int = opt(2, "retries of a failed prefill (or colocated) leg on another instance")
    failure_cooldown_s: float = opt(5.0, "skip an instance this long after it failed a leg, "
                                    "unless no other instance is left")
    abort_timeout_s: float = opt(5.0, "timeout of a control call to an engine: Abort, and the "
                                 "Tokenize/Detokenize of /tokenize, /detokenize and echo; with --workers, "
                                 "of a worker's read of another worker's metrics")
    registry_idle_timeout_s: float = opt(5.0, "reconnect the registry watch after this long without a message "
                                         "(must exceed the registry's heartbeat interval)")
    membership_grace_s: float = opt(5.0, "keep an instance a restarted registry has not heard from yet "
                                    "this long before routing stops")
    max_inflight_requests: int = opt(0, "most generation requests running at once (each with all its "
                                     "choices); more wait in the gateway's queue; 0: the sum of the registered "
                                     "--max-num-seqs of the instances that decode (decode and both)")
    max_queued_requests: int = opt(1024, "most requests waiting for a slot; past that a request gets 429 "
                                   "(queue_full) with Retry-After at once")
    queue_timeout_s: float = opt(60.0, "longest wait in the queue; then 503 (queue_timeout) with Retry-After")
    retry_after_s: int = opt(1, "the Retry-After (seconds) of a 429 or 503 from the queue")
    prefill_timeout_s: float = opt(60.0, "longest silence before a prefill (or colocated) leg's first reply "
                                   "(token or engine progress); then the leg is retried on another instance")
    decode_first_token_timeout_s: float = opt(60.0, "longest silence before decode's first reply "
                                              "(covers the KV transfer and one decode step)")
    stream_idle_timeout_s: float = opt(30.0, "longest silence of a running leg: no token, no engine progress "
                                       "(engines send progress while a request waits in their queue); then "
                                       "the client gets upstream_timeout and the request is aborted")
    request_timeout_s: float = opt(600.0, "longest end-to-end time of one request")
    max_body_bytes: int = opt(1 << 20, "larger request bodies get 413")
    max_n: int = opt(16, "largest accepted n (choices per prompt)")
    default_max_tokens: int = opt(256, "max_tokens of a chat request that sets none "
                                  "(capped by the instances' context length)")
    api_key: str | None = opt(None, "when set, /v1 requests, /tokenize, /detokenize and /metrics need "
                              "'Authorization: Bearer <key>'")
    metrics_public: bool = opt(False, "serve /metrics without the API key (for a Prometheus that sends none)")
    shutdown_timeout_s: float = opt(10.0, "on shutdown, how long in-flight requests may finish")
    gc_threshold: int = opt(20_000, "net allocations between two young-generation garbage collections "
                            "(Python's default: 700; fewer collections cost less CPU per request)")
    log_level: str = opt("info", "logging level", choices=("debug", "info", "warning", "error"))

    def validate(self) -> None:
        require(0 <= self.port < 65536, "port", "must be in 0..65535")
        require(self.workers >= 1, "workers", "must be >= 1")
        require(url_problem(self.registry) is None, "registry", str(url_problem(self.registry)))
        require(self.max_retries >= 0, "max_retries", "must be >= 0")
        require(self.local_prefill_queue >= 0, "local_prefill_queue", "must be >= 0 (0: off)")
        require(self.failure_cooldown_s >= 0, "failure_cooldown_s", "must be >= 0")
        require(self.membership_grace_s >= 0, "membership_grace_s", "must be >= 0")
        for name in ("abort_timeout_s", "registry_idle_timeout_s", "prefill_timeout_s", "decode_first_token_timeout_s",
                     "stream_idle_timeout_s", "request_timeout_s", "shutdown_timeout_s"):
            require(getattr(self, name) > 0, name, "must be > 0")
        require(self.max_body_bytes > 0, "max_body_bytes", "must be > 0")
        require(self.max_inflight_requests >= 0, "max_inflight_requests", "must be >= 0 (0: the engines' capacity)")
        require(self.max_queued_requests >= 0, "max_queued_requests", "must be >= 0 (0: no queue)")
        require(self.queue_timeout_s > 0, "queue_timeout_s", "must be > 0")
        require(self.retry_after_s >= 0, "retry_after_s", "must be >= 0")
        require(self.max_n >= 1, "max_n", "must be >= 1")
        require(self.default_max_tokens >= 1, "default_max_tokens", "must be >= 1")
        require(self.gc_threshold >= 100, "gc_threshold", "must be >= 100")
        require(self.api_key is None or len(self.api_key) > 0, "api_key", "must not be empty")
