"""The engine's own settings (no network fields: services embed or extend this)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from common.config import ConfigError, opt, require
from common.engine.tokenizer import read_chat_template

_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_size(text: str) -> int:
    """Bytes in ``"512MiB"``, ``"2GiB"``, ``"1.5GB"`` or ``"4096"``; raises ``ConfigError``."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if m is None or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"--kv-cache-memory: {text!r} is not a size like 512MiB, 2GiB or 1048576")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


ATTENTION_BACKENDS = ("auto", "torch", "triton")
DECODE_GEMVS = ("auto", "torch", "triton")


@dataclass
class EngineConfig:
    model: str = opt("demo", "model directory, hub id, or 'demo' for the built-in tiny random model")
    tokenizer: str | None = opt(
        None, "tokenizer to use instead of the model's: a directory with tokenizer.json, or a hub id"
    )
    chat_template: str | None = opt(
        None, "chat template to use instead of the model's: a file, or the Jinja template itself"
    )
    trust_remote_code: bool = opt(
        False, "accepted for vLLM compatibility and ignored: pdserve never runs a model's custom code"
    )
    dtype: str = opt("auto", "weights and KV dtype: auto, float32, float16, bfloat16")
    device: str = opt("auto", "torch device: auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    block_size: int = opt(16, "tokens per KV cache block")
    num_kv_blocks: int | None = opt(None, "KV cache blocks; none = sized from --kv-cache-memory")
    kv_cache_memory: str | None = opt(
        None,
        "KV cache size such as 512MiB or 2GiB; none = on CUDA free memory after loading x "
        "--gpu-memory-utilization, on CPU 512MiB (never more blocks than max-num-seqs full-length sequences)",
    )
    gpu_memory_utilization: float = opt(
        0.9, "fraction of free CUDA memory the KV cache may take when sized automatically"
    )
    max_num_batched_tokens: int = opt(2048, "token budget of one step (prefill chunks + decodes)")
    max_num_seqs: int = opt(64, "most sequences running at once")
    max_model_len: int | None = opt(None, "context length limit; none = the model's")
    enable_prefix_caching: bool = opt(True, "reuse KV blocks of identical prompt prefixes")
    kv_offload_cpu_gib: float = opt(
        0.0,
        "host memory (GiB, pinned on CUDA; each TP rank holds its heads' share) for prefix-cache blocks evicted "
        "from the KV cache, loaded back on a later prefix hit instead of recomputed; 0 = off",
    )
    seed: int = opt(0, "seed of the sampler for requests without their own seed")
    enforce_eager: bool = opt(
        False, "run every step eagerly: no CUDA graphs for decode steps (CPU always runs eagerly)"
    )
    async_scheduling: bool | None = opt(
        None,
        "overlap the host's work (scheduling, input ids, sampled ids to the host, outputs) with the next step's "
        "GPU work: one step in flight; none = on with CUDA, off on CPU",
    )
    tensor_parallel_size: int = opt(
        1,
        "rank processes of this instance, each holding 1/N of the attention heads and MLP; gloo on CPU, "
        "NCCL on CUDA (one GPU per rank from --device on); TP > 1 runs eagerly (no CUDA graphs) and only "
        "colocated (--role both) for now",
        aliases=("-tp",),
    )
    tensor_parallel_timeout_s: float = opt(
        120.0,
        "TP > 1: a rank's start-up (joining, loading its shard) or a step's collective that takes longer "
        "fails the engine",
    )
    attention_backend: Literal["auto", "torch", "triton"] = opt(
        "auto",
        "attention, norms, rotary and SiLU*mul: triton (paged attention reading the KV blocks in place, fused "
        "kernels; CUDA, or CPU under TRITON_INTERPRET=1 for tests), torch (plain PyTorch, any device), or auto "
        "(triton on CUDA when Triton is importable, else torch)",
        choices=ATTENTION_BACKENDS,
    )
    decode_gemv: Literal["auto", "torch", "triton"] = opt(
        "auto",
        "projections of one-row steps (a decode of one sequence) on the triton attention backend: triton "
        "(skinny-matmul kernels, the norms and SiLU*mul fused into them), torch (cuBLAS, as larger steps), or "
        "auto (triton on CUDA with --attention-backend triton)",
        choices=DECODE_GEMVS,
    )
    kv_load_failure_policy: Literal["recompute", "fail"] = opt(
        "recompute",
        "when reading a remote prefill's KV fails: compute the prompt locally, or fail the request",
    )

    def validate(self) -> None:
        power_of_two = self.block_size > 0 and self.block_size & (self.block_size - 1) == 0
        require(power_of_two, "block_size", "must be a power of two")
        require(self.num_kv_blocks is None or self.num_kv_blocks > 0, "num_kv_blocks", "must be > 0")
        if self.kv_cache_memory is not None:
            require(parse_size(self.kv_cache_memory) > 0, "kv_cache_memory", "must be > 0")
        require(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]")
        require(self.kv_offload_cpu_gib >= 0, "kv_offload_cpu_gib", "must be >= 0")
        require(self.kv_offload_cpu_gib == 0 or self.enable_prefix_caching, "kv_offload_cpu_gib",
                "needs --enable-prefix-caching (blocks are found by their prefix hash)")
        require(self.max_num_batched_tokens > 0, "max_num_batched_tokens", "must be > 0")
        require(self.max_num_seqs > 0, "max_num_seqs", "must be > 0")
        require(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        require(self.tensor_parallel_timeout_s > 0, "tensor_parallel_timeout_s", "must be > 0")
        require(self.max_model_len is None or self.max_model_len > 1, "max_model_len", "must be > 1")
        dtypes = ("auto", "float32", "float16", "bfloat16")
        require(self.dtype in dtypes, "dtype", f"must be one of {', '.join(dtypes)}")
        policies = ("recompute", "fail")
        backends = ", ".join(ATTENTION_BACKENDS)
        require(self.attention_backend in ATTENTION_BACKENDS, "attention_backend", f"must be one of {backends}")
        require(self.decode_gemv in DECODE_GEMVS, "decode_gemv", f"must be one of {', '.join(DECODE_GEMVS)}")
        require(self.kv_load_failure_policy in policies, "kv_load_failure_policy", "must be recompute or fail")
        device_ok = re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None
        require(device_ok, "device", "must be auto, cpu, cuda or cuda:N")
        if self.chat_template is not None:
            read_chat_template(self.chat_template)
