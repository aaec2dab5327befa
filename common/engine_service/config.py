"""``EngineServiceConfig``: the flags of ``pdserve prefill`` and ``pdserve decode``.

One config for every role; the subcommand supplies the ``--role`` default
(``prefill`` or ``decode``), and either subcommand also runs ``--role both``.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from common.bus import DEFAULT_MAX_FRAME_BYTES
from common.bus.curve import BusSecurity
from common.config import opt, require
from common.discovery import url_problem
from common.engine.config import EngineConfig
from common.engine_service.addresses import bind_host, check_reachable
from common.kv_transfer.config import KVTransferConfig


@dataclass
class EngineServiceConfig(EngineConfig, KVTransferConfig, BusSecurity):
    role: Literal["prefill", "decode", "both"] = opt("both", "prefill, decode, or both (colocated, no transfer)")
    bind: str | None = opt(None, "request ROUTER address (port 0: any free port); none: port 0 on the address "
                                 "--advertise-host resolves to here, or 0.0.0.0 when it is not one of this host's")
    kv_bind: str | None = opt(None, "KV side-channel ROUTER address; none: as the default of --bind")
    advertise_host: str = opt("127.0.0.1", "host the registry hands out for this engine's sockets "
                                           "(other hosts connect there: give this host's routable address)")
    kv_host: str | None = opt(None, "address peers reach this engine's transfer backend at; none: --advertise-host")
    registry: str = opt("tcp://127.0.0.1:7100", "discovery: the registry's tcp://host:port, "
                        "or etcd://host:port[,host:port...]")
    instance_id: str | None = opt(None, "unique instance id; none = <role>-<hostname>-<pid>")
    served_model_name: str | None = opt(None, "model name clients use; none = --model")
    registry_timeout_s: float = opt(5.0, "timeout of registry calls")
    remote_blocks_timeout_s: float = opt(30.0, "decode: wait this long for free blocks for a remote prefill")
    progress_interval_s: float = opt(1.0, "send each request waiting in the engine's queue (or computing its "
                                          "prompt) an empty output this often: the gateway's silence timeouts "
                                          "then tell waiting from dead (keep it well below them)")
    slow_step_log_s: float = opt(1.0, "log a warning for each engine step longer than this (seconds; 0: never): "
                                      "its length, the requests and KV blocks after it")
    shutdown_timeout_s: float = opt(10.0, "on SIGTERM, let in-flight requests finish this long, then abort them")
    max_frame_bytes: int = opt(DEFAULT_MAX_FRAME_BYTES, "largest accepted message in bytes")
    log_level: str = opt("info", "log level")
    stats_interval_s: float = opt(10.0, "log a stats line (throughput, requests, KV usage) this often while "
                                        "work is in flight or something changed; 0: never")

    def __post_init__(self) -> None:
        """Unset addresses follow ``--advertise-host`` (``addresses.bind_host``)."""
        if self.bind is None or self.kv_bind is None:
            host = bind_host(self.advertise_host)
            self.bind = self.bind or f"tcp://{host}:0"
            self.kv_bind = self.kv_bind or f"tcp://{host}:0"
        self.kv_host = self.kv_host or self.advertise_host

    def validate(self) -> None:
        roles = typing.get_args(typing.get_type_hints(type(self))["role"])
        require(self.role in roles, "role", f"must be one of {', '.join(roles)}")
        EngineConfig.validate(self)
        KVTransferConfig.validate(self)
        require(url_problem(self.registry) is None, "registry", str(url_problem(self.registry)))
        for name in ("bind", "kv_bind"):
            require(getattr(self, name).startswith(("tcp://", "ipc://")), name, "must be a tcp:// or ipc:// address")
        for name in ("bind", "kv_bind", "kv_host"):
            mismatch = check_reachable(getattr(self, name), self.advertise_host)
            require(mismatch is None, name, str(mismatch))
        for name in ("registry_timeout_s", "remote_blocks_timeout_s", "shutdown_timeout_s", "progress_interval_s"):
            require(getattr(self, name) > 0, name, "must be > 0")
        require(self.stats_interval_s >= 0, "stats_interval_s", "must be >= 0 (0: no stats line)")
        require(self.slow_step_log_s >= 0, "slow_step_log_s", "must be >= 0 (0: never)")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model
