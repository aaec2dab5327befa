"""``pdserve up``'s flags, and what each child runs with: every engine's and the gateway's flags parsed
as the child parses them (so ``up`` refuses, before starting anything, what a child would refuse), and the
GPUs each engine gets."""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from typing import Literal

from common.config import ConfigError, add_arguments, flag_name, from_args, opt, require
from common.engine_service.config import EngineServiceConfig
from services.gateway.config import GatewayConfig

LogLevel = Literal["debug", "info", "warning", "error"]

# UpConfig fields handed to every engine as the same flag, when set.
ENGINE_FLAGS = ("model", "dtype", "device", "served_model_name", "max_model_len", "block_size",
                "gpu_memory_utilization", "tensor_parallel_size", "tokenizer", "chat_template", "kv_mode")


@dataclass
class UpConfig:
    """The flags of ``pdserve up``; counts left at none mean 1."""

    mode: Literal["disagg", "colocated"] = opt("disagg", "disagg: prefill + decode instances; colocated: role-both instances")
    kv_mode: Literal["read", "push"] = opt("read", "disagg: how KV moves (engines' and gateway's --kv-mode): read "
                                           "(decode reads after prefill) or push (prefill writes into decode's "
                                           "pre-allocated blocks as it computes)", choices=("read", "push"))
    prefill: int | None = opt(None, "prefill instances, disagg only (none: 1)")
    decode: int | None = opt(None, "decode instances, disagg only (none: 1)")
    colocated: int | None = opt(None, "role-both instances, colocated only (none: 1)")
    model: str = opt("demo", "model directory, hub id, or 'demo' (tiny random model, meaningless text)")
    dtype: str = opt("auto", "engine dtype: auto, float32, float16, bfloat16")
    device: str = opt("auto", "engine device: auto, cpu, cuda, cuda:N")
    served_model_name: str | None = opt(None, "model name clients use (engines' flag); none = --model")
    max_model_len: int | None = opt(None, "context length limit (engines' flag); none = the model's")
    block_size: int | None = opt(None, "tokens per KV block (engines' flag); none = the engines' default")
    gpu_memory_utilization: float | None = opt(None, "share of free GPU memory for the KV cache (engines' "
                                                     "flag); none = the engines' default")
    tensor_parallel_size: int | None = opt(None, "ranks per engine (engines' flag); none = 1", aliases=("-tp",))
    tokenizer: str | None = opt(None, "tokenizer instead of the model's, a directory or hub id (engines' flag)")
    chat_template: str | None = opt(None, "chat template file or inline Jinja instead of the model's (engines' flag)")
    api_key: str | None = opt(None, "gateway: /v1 requests need 'Authorization: Bearer <key>'")
    host: str = opt("127.0.0.1", "gateway host")
    port: int = opt(8000, "gateway port")
    registry_backend: Literal["zmq", "etcd"] = opt("zmq", "discovery: zmq (pdserve's own registry) or etcd (a "
                                                   "local etcd member, Debian's etcd-server, for trying it)")
    registry_port: int = opt(0, "registry (or etcd client) port on 127.0.0.1 (0: a free one)")
    engine_args: str = opt("", "extra flags for every engine, after the ones above so they win, "
                               "e.g. '--num-kv-blocks 512 --max-num-seqs 32'")
    prefill_args: str = opt("", "extra flags for the prefill engines only (after --engine-args, so they win), "
                                "e.g. '--block-size 16'")
    decode_args: str = opt("", "extra flags for the decode engines only (after --engine-args), "
                               "e.g. '--block-size 32'")
    gpus: list[int] = opt([], "GPUs handed out through CUDA_VISIBLE_DEVICES, each once: every engine "
                              "(prefills first, then decodes) takes the next N of them, N its "
                              "--tensor-parallel-size; a stack needing more is refused, except that "
                              "engines all of TP 1 wrap around and share (engine i on gpus[i % len]); "
                              "empty: no pinning")
    gateway_workers: int = opt(1, "gateway worker processes serving the port (the gateway's --workers)")
    gateway_args: str = opt("", "extra flags for the gateway")
    ready_timeout_s: float = opt(180.0, "give up if the stack is not ready after this long")
    shutdown_timeout_s: float = opt(30.0, "per process group: SIGKILL after this long (engines drain "
                                          "for up to their own --shutdown-timeout-s, 10 s by default)")
    max_restarts: int = opt(5, "restart a child that died unexpectedly at most this many times")
    insecure: bool = opt(False, "no CURVE between the children (by default up makes throwaway keys for this run)")
    log_level: LogLevel = opt("info", "log level of every process")

    def validate(self) -> None:
        """Refuses counts and role flags the mode does not use, and any engine or gateway flag the child
        would refuse (naming the flag, or the ``--*-args`` it came from)."""
        if self.mode == "disagg":
            require(self.colocated is None, "colocated", "counts instances of --mode colocated only")
            require(self.prefill is None or self.prefill >= 1, "prefill", "disagg needs at least 1 prefill instance")
            require(self.decode is None or self.decode >= 1, "decode", "disagg needs at least 1 decode instance")
        else:
            for name in ("prefill", "decode", "prefill_args", "decode_args"):
                require(getattr(self, name) in (None, ""), name, "applies to --mode disagg only")
            require(self.colocated is None or self.colocated >= 1, "colocated", "colocated needs at least 1 instance")
        require(0 < self.port < 65536, "port", "must be a TCP port")
        require(0 <= self.registry_port < 65536, "registry_port", "must be a TCP port (0: a free one)")
        require(self.ready_timeout_s > 0, "ready_timeout_s", "must be > 0")
        require(self.max_restarts >= 0, "max_restarts", "must be >= 0")
        require(self.shutdown_timeout_s > 0, "shutdown_timeout_s", "must be > 0")
        require(all(g >= 0 for g in self.gpus), "gpus", "GPU ids are >= 0")
        require(len(set(self.gpus)) == len(self.gpus), "gpus", "lists a GPU twice")
        require(self.gateway_workers >= 1, "gateway_workers", "must be >= 1")
        self.gateway_config("tcp://127.0.0.1:7100")  # the registry address is up's own: any valid one will do
        self.engine_gpus()  # parses every engine's flags; refuses a stack needing more GPUs than --gpus lists

    def engine_roles(self) -> list[str]:
        """The role of each engine instance, in start order: prefills then decodes, or ``both``."""
        if self.mode == "disagg":
            counts = {"prefill": self.prefill or 1, "decode": self.decode or 1}
        else:
            counts = {"both": self.colocated or 1}
        return [role for role, count in counts.items() for _ in range(count)]

    def own_engine_flags(self) -> list[str]:
        """The engine flags ``up`` sets itself (``ENGINE_FLAGS`` that are set)."""
        values = ((name, getattr(self, name)) for name in ENGINE_FLAGS)
        return [arg for name, value in values if value is not None for arg in (flag_name(name), str(value))]

    def engine_flag_sources(self, role: str) -> list[tuple[str, list[str]]]:
        """An engine of ``role``'s flags by where they come from: ``up``'s own, ``--engine-args``, then the
        role's own (``--prefill-args``/``--decode-args``): the last given wins."""
        own = {"prefill": self.prefill_args, "decode": self.decode_args, "both": ""}[role]
        return [("", self.own_engine_flags()), ("--engine-args", shlex.split(self.engine_args)),
                (f"--{role}-args", shlex.split(own))]

    def engine_flags(self, role: str) -> list[str]:
        """The flags of an engine of ``role``, in the order of ``engine_flag_sources``."""
        return [flag for _, flags in self.engine_flag_sources(role) for flag in flags]

    def engine_config(self, role: str) -> EngineServiceConfig:
        """The config an engine of ``role`` runs with; ``ConfigError`` names the flag, after the
        ``--*-args`` it came from."""
        flags: list[str] = []
        for source, more in self.engine_flag_sources(role):
            flags += more
            try:
                config = parse_engine_flags(flags, role)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}" if source else str(e)) from None
        return config

    def engine_gpus(self) -> list[list[int]]:
        """The GPUs of each engine of ``engine_roles()`` (all empty without ``--gpus``); raises ``ConfigError``."""
        sizes = [self.engine_config(role).tensor_parallel_size for role in self.engine_roles()]
        return assign_gpus(self.gpus, sizes) if self.gpus else [[] for _ in sizes]

    def gateway_argv(self, registry: str) -> list[str]:
        """The ``pdserve gateway`` flags: ``up``'s, then ``--gateway-args`` (which win)."""
        key = ["--api-key", self.api_key] if self.api_key is not None else []
        own = ["--host", self.host, "--port", str(self.port), "--registry", registry, "--mode", self.mode,
               "--kv-mode", self.kv_mode, "--workers", str(self.gateway_workers), *key]
        return [*own, *shlex.split(self.gateway_args)]

    def gateway_config(self, registry: str) -> GatewayConfig:
        """The config the gateway runs with; ``ConfigError`` names the flag (after ``--gateway-args:``
        when it came from there)."""
        flags = self.gateway_argv(registry)
        try:
            return from_args(GatewayConfig, _parse(GatewayConfig, flags))
        except ConfigError as e:
            raise ConfigError(f"--gateway-args: {e}" if self.gateway_args else str(e)) from None


class _RaisingParser(argparse.ArgumentParser):
    """An argument parser whose errors are ``ConfigError`` rather than an exit."""

    def error(self, message: str):
        raise ConfigError(message)


def _parse(config_cls: type, flags: list[str], defaults: dict | None = None) -> argparse.Namespace:
    parser = _RaisingParser(add_help=False)
    add_arguments(parser, config_cls, defaults)
    return parser.parse_args(flags)


def parse_engine_flags(flags: list[str], role: str = "both") -> EngineServiceConfig:
    """The config of an engine of ``role`` started with ``flags``, read as the engine reads them (the last
    flag wins, then ``PDSERVE_*``, then the default); raises ``ConfigError``."""
    return from_args(EngineServiceConfig, _parse(EngineServiceConfig, flags, {"role": role}))


def tensor_parallel_size(flags: list[str]) -> int:
    """The TP size of an engine started with ``flags`` (``-tp``/``--tensor-parallel-size``, else
    ``PDSERVE_TENSOR_PARALLEL_SIZE``, else 1); raises ``ConfigError``."""
    return parse_engine_flags(flags).tensor_parallel_size


def assign_gpus(gpus: list[int], tp_sizes: list[int]) -> list[list[int]]:
    """The GPUs of each engine, in order: engine i takes the next ``tp_sizes[i]`` GPUs of ``gpus``.

    A stack needing more GPUs than ``gpus`` lists is refused with ``ConfigError`` — two TP groups
    never share a GPU — unless every engine has TP 1: those wrap around (engine i on
    ``gpus[i % len(gpus)]``), so small engines may share one GPU.
    """
    needed = sum(tp_sizes)
    if needed <= len(gpus):
        starts = [sum(tp_sizes[:i]) for i in range(len(tp_sizes))]
        return [gpus[start:start + size] for start, size in zip(starts, tp_sizes)]
    if all(size == 1 for size in tp_sizes):
        return [[gpus[i % len(gpus)]] for i in range(len(tp_sizes))]
    raise ConfigError(f"--gpus: the engines need {needed} GPUs (tensor-parallel sizes "
                      f"{', '.join(map(str, tp_sizes))}) but --gpus lists {len(gpus)}")
