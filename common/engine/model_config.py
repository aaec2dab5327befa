"""A model's architecture, normalized from its Hugging Face ``config.json`` (+ ``generation_config.json``).

``load_model_config`` reads a model directory into a ``ModelConfig``; ``ModelLoadError`` is the
one error of reading a model directory (here and in the loader and tokenizer).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import StartupError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


class ModelLoadError(StartupError):
    """A model cannot be found, understood or loaded; ``str()`` says what and where."""


@dataclass(frozen=True)
class ModelConfig:
    """The architecture, normalized from a Hugging Face ``config.json``."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # None, or {"rope_type": "linear"|"llama3", ...}
    max_model_len: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v projections
    qk_norm: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    o_proj_bias: bool = False
    mlp_bias: bool = False
    sliding_windows: tuple[int | None, ...] = ()  # per layer: attention window, None = full
    torch_dtype: str | None = None  # dtype the checkpoint was saved in


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; ``ModelLoadError`` naming the file otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


def read_eos_token_ids(path: Path) -> tuple[int, ...]:
    """EOS ids of ``generation_config.json`` then ``config.json`` (each an int or a list), deduplicated."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        if (path / name).is_file():
            ids += _token_ids(read_json(path / name).get("eos_token_id"))
    return tuple(dict.fromkeys(ids))


def _rope(cfg: dict, path: Path) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either ``rope_theta``/``rope_scaling`` or ``rope_parameters``."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    needed = {
        "linear": ("factor",),
        "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    }
    if rope_type not in needed:
        raise ModelLoadError(f"{path}: rope_type {rope_type!r} is not supported (supported: default, linear, llama3)")
    missing = [k for k in needed[rope_type] if k not in params]
    if missing:
        raise ModelLoadError(f"{path}: rope scaling {rope_type!r} lacks {', '.join(missing)}")
    return theta, {"rope_type": rope_type, **{k: float(params[k]) for k in needed[rope_type]}}


def _sliding_windows(cfg: dict, arch: str, num_layers: int, max_len: int, path: Path) -> tuple[int | None, ...]:
    """Per-layer attention window as HF derives it; windows >= max_model_len are no windows."""
    window = cfg.get("sliding_window")
    if arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and not cfg.get("use_sliding_window", False):
        window = None
    if arch == "LlamaForCausalLM" or window is None or window >= max_len:
        return (None,) * num_layers
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        first = cfg.get("max_window_layers", 0) if arch != "MistralForCausalLM" else 0
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if len(layer_types) != num_layers or not set(layer_types) <= {"sliding_attention", "full_attention"}:
        raise ModelLoadError(f"{path}: layer_types must list full_attention/sliding_attention for each layer")
    return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)


def load_model_config(path: Path) -> ModelConfig:
    """Read ``config.json`` (+ ``generation_config.json`` for EOS ids); raises ``ModelLoadError``."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path}: no config.json (not a Hugging Face model directory)")
    cfg = read_json(config_file)
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{config_file}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings")  # fmt: skip
    missing = [k for k in required if not isinstance(cfg.get(k), int)]
    if missing:
        raise ModelLoadError(f"{config_file}: missing or non-integer {', '.join(missing)}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{config_file}: hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelLoadError(f"{config_file}: partial_rotary_factor != 1 is not supported")
    num_heads = cfg["num_attention_heads"]
    num_kv_heads = cfg.get("num_key_value_heads") or num_heads
    if num_heads % num_kv_heads:
        raise ModelLoadError(
            f"{config_file}: num_attention_heads {num_heads} not a multiple of num_key_value_heads {num_kv_heads}"
        )
    num_layers = cfg["num_hidden_layers"]
    max_len = cfg["max_position_embeddings"]
    theta, scaling = _rope(cfg, config_file)

    gen_file = path / "generation_config.json"
    bos = (read_json(gen_file) if gen_file.is_file() else {}).get("bos_token_id", cfg.get("bos_token_id"))
    bias = {
        "LlamaForCausalLM": (bool(cfg.get("attention_bias")),) * 2,
        "MistralForCausalLM": (False, False),
        "Qwen2ForCausalLM": (True, False),
        "Qwen3ForCausalLM": (bool(cfg.get("attention_bias")),) * 2,
    }[arch]
    return ModelConfig(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_model_len=max_len,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bias[0],
        qk_norm=arch == "Qwen3ForCausalLM",
        eos_token_ids=read_eos_token_ids(path),
        bos_token_id=bos if isinstance(bos, int) else None,
        o_proj_bias=bias[1],
        mlp_bias=arch == "LlamaForCausalLM" and bool(cfg.get("mlp_bias")),
        sliding_windows=_sliding_windows(cfg, arch, num_layers, max_len, config_file),
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
    )
