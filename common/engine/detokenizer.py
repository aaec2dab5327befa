"""Incremental detokenization with stop strings.

Text grows by decoding a short window of ids (vLLM's ``prefix_offset`` /
``read_offset``): ``decode(ids[prefix:])`` minus ``decode(ids[prefix:read])``.
While the new text ends in U+FFFD the last token ends inside a multi-byte
character, so nothing is emitted until a later token completes it.  A tokenizer
with ``decode_stream`` (``tokenizers``' ``DecodeStream``: the same windows, one
call per token in Rust) computes the deltas; the two ``decode`` calls of
``_window_delta`` do where it has none or the stream refuses a window.

Stop strings are matched on the whole output text; a match cuts the text
before the stop string (as OpenAI does).  Until the request finishes, a tail
that could still become a stop string is held back, so a stop string spanning
tokens is never partly emitted.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

_WINDOW = 5  # prompt tokens of left context: keeps tokenizers' leading-space rules right


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


@runtime_checkable
class StreamDecoder(Decoder, Protocol):
    def decode_stream(self, context: list[int], skip_special_tokens: bool = True) -> Callable[[int], str | None] | None:
        """The text delta of each next id after ``context`` (``common.engine.tokenizer.Tokenizer``)."""


class Detokenizer:
    """The output text of one sequence, fed one token at a time."""

    def __init__(
        self, tokenizer: Decoder, prompt_token_ids: list[int], stop: list[str], skip_special_tokens: bool = True
    ):
        self.tokenizer = tokenizer
        self.ids = list(prompt_token_ids[-_WINDOW:])
        self.read_offset = len(self.ids)
        self.prefix_offset = 0
        self.stop = [s for s in stop if s]
        self.longest_stop = max(map(len, self.stop), default=0)
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self.emitted = 0  # chars of ``text`` already handed out
        self.stream = (tokenizer.decode_stream(self.ids, skip_special_tokens)
                       if isinstance(tokenizer, StreamDecoder) else None)  # fmt: skip

    def append(self, token_id: int) -> str | None:
        """Add one token; returns the stop string it completed (``text`` is then cut before it)."""
        self.ids.append(token_id)
        delta = self._stream_delta(token_id) if self.stream is not None else self._window_delta()
        if delta is None:
            return None
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        start = max(len(self.text) - self.longest_stop + 1, 0)
        self.text += delta
        if not self.stop:
            return None
        found = [(at, s) for s in self.stop if (at := self.text.find(s, start)) != -1]
        if not found:
            return None
        at, stop = min(found)
        self.text = self.text[: max(at, self.emitted)]
        return stop

    def _stream_delta(self, token_id: int) -> str | None:
        try:
            return self.stream(token_id)
        except Exception:  # tokenizers raises plain Exception; the stream's state is lost: windows from here on
            self.stream = None
            return self._window_delta()

    def _window_delta(self) -> str | None:
        """The text the last id adds: ``decode`` of the window with it minus ``decode`` of the window before."""
        decode, skip = self.tokenizer.decode, self.skip_special_tokens
        prefix_text = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=skip)
        new_text = decode(self.ids[self.prefix_offset :], skip_special_tokens=skip)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return None
        return new_text[len(prefix_text) :]

    def append_emitted(self, token_id: int) -> str | None:
        """Add a token whose text a peer already sent (the prefill's first token on the decode side):
        stop strings still see it, but it is not emitted again."""
        matched = self.append(token_id)
        self.emitted = len(self.text)
        return matched

    def take(self, final: bool) -> str:
        """Text not yet emitted; unless ``final``, minus a tail that may begin a stop string."""
        end = len(self.text) if final else len(self.text) - self._held_back()
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted : end]
        self.emitted = end
        return out

    def _held_back(self) -> int:
        text = self.text
        for k in range(min(self.longest_stop - 1, len(text) - self.emitted), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
