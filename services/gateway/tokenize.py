"""``POST /tokenize`` and ``POST /detokenize`` with vLLM's request and response shapes.

The gateway holds no tokenizer: each call goes to an instance of the model as a
``Tokenize`` / ``Detokenize`` engine request, answered by that engine's own
tokenizer, so the ids are exactly those a ``Generate`` would run.  An instance
that does not answer is skipped for the next one.

``/tokenize`` takes ``prompt`` (completion form: ``add_special_tokens`` defaults
to true) or ``messages`` (chat form, rendered by the model's chat template:
``add_special_tokens`` defaults to false, ``add_generation_prompt`` to true) and
answers ``{"count", "max_model_len", "tokens", "token_strs"}``; ``/detokenize``
takes ``tokens`` and answers ``{"prompt"}``.  ``model`` may be left out when
one model is served.
"""

from __future__ import annotations

import msgspec

from common.errors import BusError, PeerError
from common.messages import Detokenize, Detokenized, Message, Tokenize, Tokenized
from services.gateway.engine_connections import EngineConnections
from services.gateway.errors import APIError, invalid
from services.gateway.openai_protocol import chat_message, decode_body
from services.gateway.request_bodies import ChatMessageIn
from services.gateway.router import Router


class TokenizeRequest(msgspec.Struct):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(msgspec.Struct):
    tokens: list[int]
    model: str | None = None


class Tokenization:
    """Tokenize and detokenize through the model's instances (``timeout_s`` per instance asked)."""

    def __init__(self, router: Router, connections: EngineConnections, timeout_s: float):
        self.router = router
        self.connections = connections
        self.timeout_s = timeout_s

    async def tokenize(self, body: bytes) -> dict:
        req = decode_body(body, TokenizeRequest)
        if (req.prompt is None) == (req.messages is None):
            raise invalid("give exactly one of 'prompt' and 'messages'", "prompt", "missing_required_parameter")
        chat = req.messages is not None
        msg = Tokenize(prompt=req.prompt,
                       messages=[chat_message(i, m) for i, m in enumerate(req.messages)] if chat else None,
                       add_special_tokens=not chat if req.add_special_tokens is None else req.add_special_tokens,
                       add_generation_prompt=req.add_generation_prompt, return_token_strs=req.return_token_strs)
        reply = await self._ask(req.model, msg)
        assert isinstance(reply, Tokenized)
        return {"count": len(reply.token_ids), "max_model_len": reply.max_model_len, "tokens": reply.token_ids,
                "token_strs": reply.token_strs}

    async def detokenize(self, body: bytes) -> dict:
        req = decode_body(body, DetokenizeRequest)
        reply = await self.text(req.model, req.tokens)
        return {"prompt": reply}

    async def text(self, model: str | None, token_ids: list[int]) -> str:
        """The text of ``token_ids`` as ``model``'s tokenizer decodes it (special tokens kept)."""
        reply = await self._ask(model, Detokenize(token_ids))
        assert isinstance(reply, Detokenized)
        return reply.text

    async def _ask(self, model: str | None, msg: Message) -> Message:
        """``msg``'s reply from the first instance of the model that answers: 400 for what the engine
        refused, 503 when none answered."""
        failures = []
        for inst in self.router.of_model(self.router.served(model)):
            try:
                return await self.connections.get(inst).call(msg, timeout=self.timeout_s)
            except PeerError as e:
                if e.code == "invalid_request":
                    raise invalid(e.message, e.param) from None
                failures.append(f"{inst.id}: {e}")
            except BusError as e:
                failures.append(f"{inst.id}: {e}")
        raise APIError(503, f"no instance could {type(msg).__name__.lower()}: {'; '.join(failures)}",
                       code="upstream_unavailable")
