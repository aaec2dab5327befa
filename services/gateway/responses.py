"""JSON responses: the ASGI response class, error responses, and a whole (non-streaming) answer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import msgspec
from starlette.types import Receive, Scope, Send

from services.gateway import openai_protocol as oai
from services.gateway.errors import APIError
from services.gateway.flow import ChoiceEvent, ChoiceStats

if TYPE_CHECKING:
    from services.gateway.direct import DirectRequest

_json = msgspec.json.Encoder().encode


class JSONResponse:
    """``obj`` as a JSON response (with ``X-Request-Id`` when given), an ASGI app like Starlette's
    responses and a ``direct`` answer (``write``): the raw headers are built directly, without the
    per-response header bookkeeping of Starlette's ``Response``, a measurable share of a short
    request's cost."""

    __slots__ = ("status_code", "body", "raw_headers")

    def __init__(self, obj: object, status: int = 200, request_id: str | None = None):
        self.status_code = status
        self.body = _json(obj)
        self.raw_headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(self.body))]
        if request_id:
            self.raw_headers.append((b"x-request-id", request_id.encode()))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body})

    def write(self, request: DirectRequest) -> None:
        """The answer on ``request``, in one write."""
        request.start(self.status_code, self.raw_headers, length=True)
        request.send(self.body)


def error_response(e: APIError, request_id: str | None = None) -> JSONResponse:
    """``e`` as its status with the OpenAI error body (and ``Retry-After`` when ``e`` has one)."""
    response = JSONResponse(e.body(), e.status, request_id)
    if e.retry_after is not None:
        response.raw_headers.append((b"retry-after", b"%d" % e.retry_after))
    return response


def logprob_entries(event: ChoiceEvent) -> list:
    """(TokenLogprob, token string) pairs of one piece (see ``openai_protocol`` on token strings)."""
    piece = event.piece
    if not piece.logprobs:
        return []
    single = len(piece.token_ids) == 1
    return [(lp, lp.token or (piece.text if single else f"token_id:{lp.token_id}")) for lp in piece.logprobs]


def usage(req: oai.ParsedRequest, stats: Sequence[ChoiceStats]) -> dict:
    """Prompt and cached tokens once per prompt (its first choice), completion tokens of every choice."""
    firsts = stats[::req.n]
    return oai.usage_dict(sum(s.prompt_tokens for s in firsts), sum(s.completion_tokens for s in stats),
                          sum(s.cached_tokens for s in firsts))


class ChoiceText:
    """What one choice has produced so far."""

    __slots__ = ("text", "logprobs", "finish_reason")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.logprobs: list = []
        self.finish_reason: str | None = None


class ResponseCollector:
    """The emit target of a non-streaming request: each piece added to its choice; ``body`` the answer."""

    __slots__ = ("req", "choices")

    def __init__(self, req: oai.ParsedRequest):
        self.req = req
        self.choices = [ChoiceText() for _ in range(len(req.prompts) * req.n)]

    def add(self, event: ChoiceEvent) -> None:
        c = self.choices[event.index]
        c.text.append(event.piece.text)
        if self.req.logprobs:
            c.logprobs.extend(logprob_entries(event))
        if event.piece.finish_reason is not None:
            c.finish_reason = event.piece.finish_reason

    def body(self, request_id: str, stats: Sequence[ChoiceStats]) -> dict:
        """The whole OpenAI response once every choice finished."""
        req = self.req
        out = []
        for i, c in enumerate(self.choices):
            logprobs = None
            if req.logprobs:
                logprobs = (oai.completion_logprobs(c.logprobs, 0) if req.kind == "completion"
                            else oai.chat_logprobs(c.logprobs))
            text = req.echo_text(i) + "".join(c.text)
            out.append(oai.full_choice(req.kind, i, text, c.finish_reason or "stop", logprobs))
        return oai.full_response(req, request_id, out, usage(req, stats))
