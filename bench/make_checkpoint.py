"""Write a random-weight Hugging Face checkpoint of a named shape, for benchmarks.

    python -m bench.make_checkpoint --shape llama-3.2-1b --out /tmp/llama-1b --device cuda

Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` and the demo
model's byte-level tokenizer (``tokenizer.json``, ``tokenizer_config.json``; its ids are
all below any shape's vocab, so random-token workloads may use ids up to the vocab size).
Weights are drawn directly in bfloat16 on ``--device`` from one seeded generator, in
sorted parameter order: the same seed on the same device type gives the same bytes.
Scale as the demo model: norms 1, embeddings N(0, 1), projections N(0, 1/in_features).
Its text output is meaningless by design.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from common.engine.demo_model import BOS, CHAT_TEMPLATE, EOS, EOT, build_tokenizer
from common.engine.loader import load_model_config
from common.engine.model import CausalLM

logger = logging.getLogger(__name__)

LLAMA_3_2_1B = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": True,
}
DEMO = {  # the built-in demo model's shape (common/engine/demo_model.py); vocab = the tokenizer's
    "vocab_size": None,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
}
SHAPES = {"llama-3.2-1b": LLAMA_3_2_1B, "demo": DEMO}


class CheckpointError(ValueError):
    """A checkpoint cannot be written as asked (unknown shape, unusable output directory or device)."""


def write_checkpoint(out: Path, shape: str, seed: int = 0, device: str = "cpu") -> Path:
    """Write every file of a ``shape`` checkpoint into ``out`` (created; must be empty if it exists)."""
    if shape not in SHAPES:
        raise CheckpointError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} asked for but CUDA is not available")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} exists and is not an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    bos_id, eos_id, eot_id = vocab[BOS], vocab[EOS], vocab[EOT]
    dims = dict(SHAPES[shape])
    dims["vocab_size"] = dims["vocab_size"] or tokenizer.get_vocab_size(with_added_tokens=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **dims,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "bfloat16",
    }
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": [eos_id, eot_id]})
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "chat_template": CHAT_TEMPLATE,
            "model_max_length": config["max_position_embeddings"],
            "clean_up_tokenization_spaces": False,
        },
    )
    weights = random_weights(load_model_config(out), seed, torch.device(device))
    save_file({name: w.cpu() for name, w in weights.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def random_weights(config, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Seeded bfloat16 weights, drawn on ``device``, for every parameter of ``CausalLM(config)``."""
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in CausalLM(config).named_parameters()}
    generator = torch.Generator(device=device).manual_seed(seed)
    weights = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if len(shape) == 1:
            weights[name] = torch.ones(shape, dtype=torch.bfloat16, device=device)
            continue
        w = torch.randn(shape, generator=generator, dtype=torch.bfloat16, device=device)
        std = 1.0 if "embed_tokens" in name else (4.0 if name == "lm_head.weight" else 1.0) / shape[1] ** 0.5
        weights[name] = w.mul_(std)
    return weights


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES), help="model shape to write")
    parser.add_argument("--out", required=True, type=Path, help="output directory (created; must be empty)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weight generator")
    parser.add_argument("--device", default="cpu", help="where the weights are drawn: cpu, cuda, cuda:N")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        path = write_checkpoint(args.out, args.shape, args.seed, args.device)
    except CheckpointError as e:
        parser.error(str(e))
    size = (path / "model.safetensors").stat().st_size
    logger.info("wrote %s (%s, %.2f GB of weights) in %.1f s", path, args.shape, size / 1e9, time.perf_counter() - start)


if __name__ == "__main__":
    main()
