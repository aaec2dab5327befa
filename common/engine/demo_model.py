"""The built-in ``demo`` model: a tiny random-weight Llama checkpoint in standard HF format.

Written once per cache dir (temp dir + atomic rename, so concurrent processes are safe)
and byte-identical on every machine: weights come from a seeded ``torch.Generator``,
the byte-level BPE merges from a fixed corpus with a deterministic tie-break.
Its text output is meaningless by design.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from common.engine.model import CausalLM
from common.engine.model_config import ModelConfig, load_model_config

logger = logging.getLogger(__name__)

DEMO_VERSION = 2
SEED = 1234
BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot|>"
NUM_MERGES = 300
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}" + EOT + "\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CORPUS = """\
The quick brown fox jumps over the lazy dog. A user asks a question and the assistant answers it.
Prefill computes the prompt once; decode then produces one token after another, reading the key and
value cache that prefill wrote. When the two run on different machines, the cache moves between them
in blocks: each block holds the keys and values of every layer for a fixed number of positions.
Hello, world! How are you today? I am fine, thank you. What is the capital of France? It is Paris.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024. def main(): return print("hello") if x == 1 else None
"""


def default_cache_dir() -> Path:
    """``$PDSERVE_CACHE_DIR`` or ``~/.cache/pdserve``."""
    return Path(os.environ.get("PDSERVE_CACHE_DIR") or Path.home() / ".cache" / "pdserve")


def ensure_demo_checkpoint(cache_dir: Path | None = None) -> Path:
    """Path of ``<cache>/demo-llama-v<version>``, writing the checkpoint first if it is absent."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / f"demo-llama-v{DEMO_VERSION}"
    if (target / "model.safetensors").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".demo-llama-tmp-"))
    try:
        write_demo_checkpoint(tmp)
        for file in tmp.iterdir():
            file.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared
        os.rename(tmp, target)
        logger.info("wrote the demo checkpoint to %s", target)
    except OSError:
        if not (target / "model.safetensors").is_file():  # not a lost race with another writer
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


DEMO_SHAPE = {  # vocab_size None: the tokenizer's
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


def write_demo_checkpoint(path: Path) -> None:
    """Write every file of the demo checkpoint into the existing directory ``path``."""
    write_random_checkpoint(path, DEMO_SHAPE, SEED, torch.device("cpu"))


def write_random_checkpoint(path: Path, shape: dict, seed: int, device: torch.device) -> None:
    """A random-weight ``LlamaForCausalLM`` of ``shape`` (config.json dimensions) with the demo
    tokenizer grown to the shape's vocab (see ``build_tokenizer``), in standard HF format, into the
    existing directory ``path``."""
    tokenizer = build_tokenizer(shape["vocab_size"])
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    bos_id, eos_id, eot_id = vocab[BOS], vocab[EOS], vocab[EOT]
    tokenizer.save(str(path / "tokenizer.json"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **shape,
        "vocab_size": shape["vocab_size"] or tokenizer.get_vocab_size(with_added_tokens=True),
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "bfloat16",
    }
    _write_json(path / "config.json", config)
    _write_json(path / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": [eos_id, eot_id]})
    _write_json(
        path / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "chat_template": CHAT_TEMPLATE,
            "model_max_length": config["max_position_embeddings"],
            "clean_up_tokenization_spaces": False,
        },
    )
    weights = random_weights(load_model_config(path), seed, device)
    save_file({name: w.cpu() for name, w in weights.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def random_weights(config: ModelConfig, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Seeded bfloat16 weights, drawn on ``device`` in sorted parameter order, for every parameter of
    ``CausalLM(config)``: norms 1, embeddings N(0, 1), projections N(0, 1/in_features) (the head 4x
    wider so that logits are peaked).  The same seed on the same device type gives the same bytes."""
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


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + len(chars) - 188)
    return {b: chr(c) for b, c in zip(printable, chars)}


def learn_merges(corpus: str, num_merges: int) -> list[tuple[str, str]]:
    """BPE merges of ``corpus`` (byte-level words); ties broken by the smaller pair, so deterministic."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = Counter(tuple(word) for word, _ in pre.pre_tokenize_str(corpus))
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:  # only pairs seen twice: the vocabulary stays small (336 ids)
            break
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def filler_tokens(count: int, taken: set[str]) -> list[str]:
    """``count`` byte-level token strings not in ``taken``: every string of 2, then 3, ... printable
    ASCII characters (space included), in a fixed order.  Each decodes to that ASCII text."""
    table = bytes_to_unicode()
    alphabet = [table[b] for b in range(ord(" "), ord("~") + 1)]
    strings = ("".join(chars) for length in itertools.count(2) for chars in itertools.product(alphabet, repeat=length))
    return list(itertools.islice((token for token in strings if token not in taken), count))


def build_tokenizer(vocab_size: int | None = None) -> Tokenizer:
    """Byte-level BPE: ids 0-255 are the bytes, then the learned merges, then BOS, EOS, EOT (336 ids),
    then, up to ``vocab_size`` when it is given, filler tokens (``filler_tokens``) that encoding never
    produces but every one of which decodes to non-empty text, so any id a model of that vocab emits
    has text."""
    vocab = {ch: b for b, ch in sorted(bytes_to_unicode().items())}
    merges = learn_merges(CORPUS, NUM_MERGES)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for special in (BOS, EOS, EOT):
        vocab[special] = len(vocab)
    if vocab_size is not None:
        if vocab_size < len(vocab):
            raise ValueError(f"vocab_size {vocab_size} is below the demo tokenizer's {len(vocab)} ids")
        for token in filler_tokens(vocab_size - len(vocab), set(vocab)):
            vocab[token] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (BOS, EOS, EOT)])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return tokenizer
