"""Write a random-weight Hugging Face checkpoint of a named shape, for benchmarks.

    python -m bench.make_checkpoint --shape llama-3.2-1b --out /tmp/llama-1b --device cuda
    python -m bench.make_checkpoint --shape llama-3.1-8b --out /tmp/llama-8b --device cuda

Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` and a byte-level
tokenizer covering the shape's whole vocab (``tokenizer.json``, ``tokenizer_config.json``:
the demo model's, grown with filler tokens; every id decodes to non-empty text, so the
output of random weights can be read and counted).  Weights are drawn directly in bfloat16
on ``--device`` from one seeded generator, in sorted parameter order: the same seed on the
same device type gives the same bytes.  Scale as the demo model: norms 1, embeddings
N(0, 1), projections N(0, 1/in_features).  Its text output is meaningless by design.
The 8B shape holds 16 GB of bfloat16 weights, drawn on ``--device`` and then copied to
host memory to be written.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from common.engine.demo_model import DEMO_SHAPE, write_random_checkpoint

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
LLAMA_3_1_8B = {  # as meta-llama/Llama-3.1-8B's config.json
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": False,
}
SHAPES = {"llama-3.2-1b": LLAMA_3_2_1B, "llama-3.1-8b": LLAMA_3_1_8B, "demo": DEMO_SHAPE}


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
    write_random_checkpoint(out, SHAPES[shape], seed, torch.device(device))
    return out


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
