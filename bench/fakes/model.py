"""The fake "model": bytes in, letters out, deterministically.

The vocabulary is bytes (token id = byte value; ids beyond it count by their
low byte).  A prompt is its UTF-8 bytes, chat messages rendered as
``role: content\\n`` lines plus ``assistant:``.  Output token ``i`` is a letter
of ``ALPHABET`` picked by a hash of (prompt, seed if temperature > 0, i): the
same in colocated and P/D runs, so tests can compute the expected text with
``token_at``.
"""

from __future__ import annotations

import zlib

from common.engine.block_manager import hash_block
from common.messages import SamplingParams, TokenLogprob

ALPHABET = "abcdefghijklmnopqrstuvwxyz "


def as_bytes(token_ids: list[int]) -> bytes:
    """Token ids as bytes (each id's low byte)."""
    try:
        return bytes(token_ids)
    except ValueError:  # ids beyond the byte vocabulary
        return bytes(t & 0xFF for t in token_ids)


class ByteTokenizer:
    """The tokenizer interface the engine's ``Detokenizer`` and prompt rendering use, over bytes."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return as_bytes(token_ids).decode("utf-8", "replace")

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def prompt_key(prompt_ids: list[int]) -> int:
    """What output tokens depend on: a hash of the prompt's bytes."""
    return zlib.crc32(as_bytes(prompt_ids))


def token_at(prompt_ids: list[int] | int, sampling: SamplingParams, i: int) -> int:
    """Output token ``i`` of a prompt (its ids or ``prompt_key``): deterministic, seed-dependent when sampling."""
    key = prompt_ids if isinstance(prompt_ids, int) else prompt_key(prompt_ids)
    seed = sampling.seed if sampling.temperature > 0 and sampling.seed is not None else 0
    mixed = key ^ (seed * 0x9E3779B1) ^ (i * 0x85EBCA6B)
    return ord(ALPHABET[zlib.crc32(mixed.to_bytes(16, "little", signed=True)) % len(ALPHABET)])


def logprob_of(token: int, i: int, k: int) -> TokenLogprob:
    """Output token ``i``'s logprob with ``k`` top alternatives (the token itself first)."""
    lp = -0.25 * (1 + i % 4)
    others = [t for t in (ord(c) for c in ALPHABET) if t != token][: max(k - 1, 0)]
    top = [(token, lp)] + [(t, lp - 1.0 - j) for j, t in enumerate(others)] if k > 0 else []
    return TokenLogprob(token_id=token, logprob=lp, top=top, token=chr(token), top_tokens=[chr(t) for t, _ in top])


class PrefixCache:
    """Full prompt blocks seen, by the engine's chained ``hash_block``; never evicts."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._hashes: set[int] = set()

    def hit_tokens(self, prompt_ids: list[int]) -> int:
        """Tokens of the prompt's leading blocks seen before (at most all but one token); records
        the prompt's blocks for later requests."""
        bs, prev, hits, leading = self.block_size, 0, 0, True
        for b in range(len(prompt_ids) // bs):
            prev = hash_block(tuple(prompt_ids[b * bs : (b + 1) * bs]), prev)
            if leading and prev in self._hashes:
                hits += 1
            else:
                leading = False
                self._hashes.add(prev)
        return min(hits * bs, len(prompt_ids) - 1)
