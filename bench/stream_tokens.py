"""Which chunks of an OpenAI-style SSE completion stream carry output tokens, and how many tokens.

Text is no evidence of tokens: a token may decode to nothing (a special token, one byte of an
unfinished UTF-8 character, an id the tokenizer has no text for).  So a choice chunk carries:

- the tokens it reports, where it reports them: ``token_ids``, or the entries of its ``logprobs``;
- else one token or more when it has text, or when it is a plain content chunk with empty text
  (no ``finish_reason``; servers send a content chunk only for new output);
- none when it is a chat role announcement with empty content (OpenAI, vLLM and SGLang open
  every chat stream with one, before any token);
- for a last chunk with ``finish_reason`` and empty text, which is either a final token that
  decodes to nothing or a bare end marker: a token when ``usage.completion_tokens`` counts more
  tokens than the other chunks account for, else none (and none without ``usage``).

The request's token count is ``usage.completion_tokens`` when the server reports it
(``stream_options.include_usage``), else the tokens counted from the chunks.
"""

from __future__ import annotations


def reported_tokens(choice: dict) -> int | None:
    """How many tokens ``choice`` says it carries (``token_ids`` or logprobs entries); None if it does not say."""
    token_ids = choice.get("token_ids")
    if token_ids is not None:
        return len(token_ids)
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict):
        entries = logprobs.get("tokens", logprobs.get("content"))  # completions / chat
        if entries is not None:
            return len(entries)
    return None


def choice_text(choice: dict) -> str:
    """The output text a completion or chat choice chunk carries ('' for none)."""
    if "text" in choice:
        return choice["text"] or ""
    delta = choice.get("delta") or {}
    return (delta.get("content") or "") + (delta.get("reasoning_content") or "")


class StreamTokens:
    """The token-bearing chunks of one streamed response: their arrival times and token counts.

    Feed every parsed data chunk to ``add`` in order, then call ``close`` once the stream ended;
    ``times``, ``output_tokens`` and ``source`` hold the result after ``close``."""

    __slots__ = ("times", "counted", "usage_tokens", "prompt_tokens", "_end_marker_at")

    def __init__(self) -> None:
        self.times: list[float] = []  # arrival time of every token-bearing chunk
        self.counted = 0  # tokens accounted for by those chunks
        self.usage_tokens: int | None = None  # the server's usage.completion_tokens, when it sent one
        self.prompt_tokens: int | None = None  # the server's usage.prompt_tokens, when it sent one
        self._end_marker_at: float | None = None

    def add(self, chunk: dict, now: float) -> None:
        """Account for one data chunk that arrived at ``now``."""
        usage = chunk.get("usage")
        if usage:
            self.prompt_tokens = usage.get("prompt_tokens", self.prompt_tokens)
            self.usage_tokens = usage.get("completion_tokens", 0)
        choices = chunk.get("choices") or []
        if not choices:
            return
        choice = choices[0]
        tokens = reported_tokens(choice)
        if tokens is None:
            if choice_text(choice):
                tokens = 1
            elif choice.get("finish_reason") is not None:
                self._end_marker_at = now  # decided in close()
                return
            elif "role" in (choice.get("delta") or {}):
                return
            else:
                tokens = 1
        if tokens:
            self.times.append(now)
            self.counted += tokens

    def close(self) -> None:
        """Decide whether an empty last chunk with a finish reason carried a token (see the module doc)."""
        if self._end_marker_at is not None and self.usage_tokens is not None and self.usage_tokens > self.counted:
            self.times.append(self._end_marker_at)
            self.counted += 1
        self._end_marker_at = None

    @property
    def output_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else self.counted

    @property
    def source(self) -> str:
        """Where ``output_tokens`` comes from: "usage" (the server's count) or "chunks" (counted here)."""
        return "usage" if self.usage_tokens is not None else "chunks"
