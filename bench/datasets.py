"""Benchmark prompts: a random dataset of controlled lengths, or a JSONL file.

Random prompts have ``uniform[L*(1-r), L*(1+r)]`` tokens (integers, at least 1);
the same range ratio applies to the output length.  How a length becomes text:

- ``tokenizer-exact``: with a local ``tokenizer.json``, draw random token ids
  (not special, and each decoding to whole characters), decode them, re-encode the text (without special tokens) and adjust:
  truncate the re-encoded ids when too long, append fresh random ids when too
  short, decode again, until re-encoding gives exactly the target count.  The
  count excludes special tokens and chat-template tokens the server may add.
- ``approx-words``: without a tokenizer, words drawn from a fixed vocabulary of
  common short English words, each of which is one token (with its leading
  space) in common BPE vocabularies: one word ~ one token.  Only an
  approximation: a byte-level tokenizer makes ~3 tokens of each word.

``model_tokenizer`` finds a model's ``tokenizer.json`` without the network.

A JSONL file holds one object per line: ``{"prompt": str}`` or
``{"messages": [{"role", "content"}, ...]}`` (chat only), each with an optional
``"output_len"`` (default: ``--output-len``).  Its prompt lengths are counted
with the tokenizer when there is one, else as whitespace-separated words.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from common.errors import PdserveError


EXACT = "tokenizer-exact"
APPROX = "approx-words"
MAX_ADJUST_ROUNDS = 20

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have "
    "an they you were her she there one all we their has been if would will what can when so no said who "
    "more about up out them some could time these two may then do first any my now such like our over man "
    "me even most made after also did many before must through back years where much your way well down "
    "should because each just those people how too little state good very make world still own see men "
    "work long get here between both life being under never day same another know while last might us "
    "great old year off come since against go came right used take three"
).split()


class DatasetError(PdserveError):
    """A dataset file or tokenizer cannot be used for this benchmark."""


@dataclass(slots=True)
class Sample:
    """One request's input: ``prompt`` text, or chat ``messages`` when the file gave them."""

    prompt: str | None
    messages: list[dict] | None
    prompt_len: int  # tokens by the dataset's own count (the server's usage overrides it)
    output_len: int


@dataclass(slots=True)
class Dataset:
    samples: list[Sample]
    source: str  # "random" or the file path
    length_method: str  # EXACT or APPROX
    tokenizer: str | None = None  # the tokenizer.json that counted the lengths (EXACT)

    def describe(self) -> dict:
        """What the prompts are; their mean length in tokens only when a tokenizer counted it, else in words."""
        n = len(self.samples)
        unit = "mean_prompt_len" if self.length_method == EXACT else "mean_prompt_words"
        return {
            "source": self.source,
            "length_method": self.length_method,
            "tokenizer": self.tokenizer,
            "num_samples": n,
            unit: sum(s.prompt_len for s in self.samples) / n,
            "mean_output_len": sum(s.output_len for s in self.samples) / n,
        }


def tokenizer_file(path: str | None) -> Path | None:
    """``path`` itself if it is a ``*.json`` file, else its ``tokenizer.json`` if it is a directory holding one."""
    if not path:
        return None
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    return file if file.is_file() and file.suffix == ".json" else None


def model_tokenizer(name: str, pdserve_demo: bool = False) -> Path | None:
    """The ``tokenizer.json`` of model ``name``, found without the network: ``name`` is a local
    model directory or tokenizer file, pdserve's built-in demo model (``'demo'`` served by pdserve:
    ``pdserve_demo``; byte-identical everywhere, so written into the local cache if absent), or a
    Hugging Face hub id whose tokenizer is in the local hub cache.  None when it is none of these."""
    if (file := tokenizer_file(name)) is not None:
        return file
    if pdserve_demo and name == "demo":
        from common.engine.demo_model import ensure_demo_checkpoint  # torch only for the demo model

        try:
            return ensure_demo_checkpoint() / "tokenizer.json"
        except OSError as e:
            raise DatasetError(f"cannot write the demo model's tokenizer ({e}): set PDSERVE_CACHE_DIR or pass "
                               "--tokenizer") from e
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(name, "tokenizer.json")
    except HFValidationError:  # not a hub id
        return None
    return Path(cached) if isinstance(cached, str) else None


def load_tokenizer(file: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library raises plain Exception subclasses
        raise DatasetError(f"cannot load tokenizer {file}: {e}") from e


def sample_lengths(rng: random.Random, n: int, length: int, range_ratio: float) -> list[int]:
    lo = max(1, int(length * (1 - range_ratio)))
    hi = max(lo, int(length * (1 + range_ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


class ExactPromptMaker:
    """Texts that the tokenizer encodes to exactly the requested number of tokens."""

    def __init__(self, tokenizer: Tokenizer, rng: random.Random):
        self.tokenizer = tokenizer
        self.rng = rng
        special = set(tokenizer.get_added_tokens_decoder())
        ids = [i for i in range(tokenizer.get_vocab_size()) if i not in special]
        texts = tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=True)
        # byte-fallback tokens holding part of a UTF-8 character decode to U+FFFD, which re-encodes longer
        self.candidates = [i for i, t in zip(ids, texts) if t.strip() and "\ufffd" not in t]
        if not self.candidates:
            raise DatasetError("the tokenizer has no token that decodes to whole characters")

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def make(self, target: int) -> str:
        ids = [self.rng.choice(self.candidates) for _ in range(target)]
        for _ in range(MAX_ADJUST_ROUNDS):
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
            if len(ids) == target:
                return text
            if len(ids) > target:
                ids = ids[:target]
            else:
                ids = ids + [self.rng.choice(self.candidates) for _ in range(target - len(ids))]
        raise DatasetError(f"could not make a prompt of exactly {target} tokens in {MAX_ADJUST_ROUNDS} rounds")


def random_dataset(
    num: int, input_len: int, output_len: int, range_ratio: float, seed: int, tokenizer_path: Path | None
) -> Dataset:
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path is not None else None
    rng = random.Random(seed)
    in_lens = sample_lengths(rng, num, input_len, range_ratio)
    out_lens = sample_lengths(rng, num, output_len, range_ratio)
    if tokenizer is not None:
        maker = ExactPromptMaker(tokenizer, rng)
        prompts = [maker.make(n) for n in in_lens]
        method = EXACT
    else:
        prompts = [" ".join(rng.choice(WORDS) for _ in range(n)) for n in in_lens]
        method = APPROX
    samples = [Sample(p, None, n, o) for p, n, o in zip(prompts, in_lens, out_lens)]
    return Dataset(samples, "random", method, str(tokenizer_path) if tokenizer_path else None)


def _count(text: str, tokenizer: Tokenizer | None) -> int:
    if tokenizer is None:
        return len(text.split())
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


def _parse_line(obj: object, where: str, default_output_len: int, tokenizer: Tokenizer | None) -> Sample:
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object")
    output_len = obj.get("output_len", default_output_len)
    if not isinstance(output_len, int) or isinstance(output_len, bool) or output_len < 1:
        raise DatasetError(f"{where}: output_len must be an integer >= 1")
    if "prompt" in obj:
        prompt = obj["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise DatasetError(f"{where}: prompt must be a non-empty string")
        return Sample(prompt, None, _count(prompt, tokenizer), output_len)
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: needs a 'prompt' string or a non-empty 'messages' list")
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DatasetError(f"{where}: every message needs string 'role' and 'content'")
    return Sample(None, messages, sum(_count(m["content"], tokenizer) for m in messages), output_len)


def jsonl_dataset(path: str, num: int, default_output_len: int, tokenizer_path: Path | None, chat: bool) -> Dataset:
    """The first ``num`` samples of a JSONL file (``messages`` lines need ``chat``)."""
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path is not None else None
    samples: list[Sample] = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if len(samples) == num:
                    break
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{where}: invalid JSON ({e.msg})") from e
                sample = _parse_line(obj, where, default_output_len, tokenizer)
                if sample.messages is not None and not chat:
                    raise DatasetError(f"{where}: 'messages' needs --endpoint chat")
                samples.append(sample)
    except OSError as e:
        raise DatasetError(f"cannot read dataset {path}: {e.strerror}") from e
    if len(samples) < num:
        raise DatasetError(f"{path} has {len(samples)} samples, fewer than --num-prompts {num}")
    return Dataset(samples, path, EXACT if tokenizer is not None else APPROX,
                   str(tokenizer_path) if tokenizer_path else None)
