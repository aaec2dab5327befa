"""A ``Generate``'s prompt as token ids: the one rule every engine (and the fake engines) applies."""

from __future__ import annotations

from typing import Protocol

from common.errors import PeerError
from common.messages import Generate, gives_one_prompt


class PromptTokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str: ...


def prompt_token_ids(tokenizer: PromptTokenizer, msg: Generate) -> list[int]:
    """The prompt's ids (chat messages rendered by the model's template); ``PeerError`` unless the
    request gives exactly one of ``prompt``, ``prompt_token_ids``, ``messages``, or for a template error."""
    if not gives_one_prompt(msg):
        raise PeerError("invalid_request", "give exactly one of prompt, prompt_token_ids, messages", "prompt")
    if msg.prompt_token_ids is not None:
        return list(msg.prompt_token_ids)
    if msg.prompt is not None:
        return tokenizer.encode(msg.prompt)
    try:
        text = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in msg.messages])
    except ValueError as e:
        raise PeerError("invalid_request", str(e), "messages") from e
    return tokenizer.encode(text, add_special_tokens=False)
