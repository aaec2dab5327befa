"""Tiny random-weight Hugging Face checkpoints written by ``transformers`` itself (test reference).

``make_hf_checkpoint(path, family, tokenizer_dir)`` saves one with ``save_pretrained``
(safetensors) plus the tokenizer files of ``tokenizer_dir`` (e.g. the demo checkpoint), and
returns the ``transformers`` model (fp32, eager attention, eval) to compare against.
``config_overrides`` change the family's config (e.g. ``attention_bias=True``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import tokenizers
import torch

_COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256,
    initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)  # fmt: skip

FAMILIES: dict[str, tuple[str, dict]] = {
    # Llama-3 style rope scaling (original context 16, so it matters at test positions), GQA 4:2, untied
    "llama": (
        "LlamaConfig",
        dict(
            num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False,
            rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_position_embeddings=16),
        ),
    ),  # fmt: skip
    # Sliding window 12 < test sequence lengths, GQA 4:1
    "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=12)),
    # QKV bias, tied embeddings, GQA 4:2
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    # Per-head q/k RMSNorm, explicit head_dim 32 (!= 64 / 4), GQA 4:2
    "qwen3": (
        "Qwen3Config",
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
    ),
}


def make_hf_checkpoint(
    path: Path, family: str, tokenizer_dir: Path, seed: int = 0, max_shard_size: str | None = None,
    **config_overrides,
):
    """Write a ``family`` checkpoint into ``path``; returns the ``transformers`` model it holds."""
    import transformers

    config_cls, overrides = FAMILIES[family]
    vocab_size = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    config = getattr(transformers, config_cls)(**{"vocab_size": vocab_size, **_COMMON, **overrides, **config_overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    # HF initialises norms to 1 and biases to 0: perturb them so that both are exercised
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    path.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, path / name)
    return model
