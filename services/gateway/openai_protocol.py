"""OpenAI request parsing and validation, and response building.

``parse_completion`` / ``parse_chat`` turn a raw JSON body (``request_bodies``) into a ``ParsedRequest``
(typed, validated, engine-ready) or raise ``APIError(400)`` naming the bad
parameter.  The ``*_response`` / ``*_chunk`` builders produce the JSON objects of
the official API (checked in the tests against the ``openai`` client's models).

Token strings in logprobs: the engine reports each token's text with its
logprobs (``TokenLogprob.token`` / ``top_tokens``).  An engine that sends none
falls back to the output's text when that output holds exactly that one token,
else ``"token_id:<id>"`` (vLLM's ``return_tokens_as_token_ids`` convention).
"""

from __future__ import annotations

import operator
import re
import time
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from common.messages import MAX_LOGPROBS, ChatMessage, SamplingParams, TokenLogprob
from services.gateway.errors import invalid
from services.gateway.request_bodies import ChatCompletionRequest, ChatMessageIn, CommonFields, CompletionRequest

INT64_MAX = (1 << 63) - 1
MAX_STOP = 16
CHAT_ROLES = ("system", "developer", "user", "assistant")

Kind = Literal["completion", "chat"]
# vLLM's sampling parameters pdserve does not build, each with the value that changes nothing (None: any
# value is refused); a request setting another is refused naming it rather than served as if it were not set.
NOT_BUILT = {"presence_penalty": 0, "frequency_penalty": 0, "repetition_penalty": 1, "min_p": 0, "min_tokens": 0,
             "logit_bias": {}, "guided_json": None, "guided_regex": None, "guided_choice": None,
             "guided_grammar": None}
_not_built = operator.attrgetter(*NOT_BUILT)
_NONE_GIVEN = (None,) * len(NOT_BUILT)


# --------------------------------------------------------------------------- #
# Parsed, engine-ready request
# --------------------------------------------------------------------------- #


@dataclass(slots=True)
class Prompt:
    """Exactly one of the three is set: what the engine's ``Generate`` carries; ``echo_text`` starts
    each of its choices' output (``echo``)."""

    text: str | None = None
    token_ids: list[int] | None = None
    messages: list[ChatMessage] | None = None
    echo_text: str = ""

    def generate_fields(self) -> dict:
        if self.text is not None:
            return {"prompt": self.text}
        if self.token_ids is not None:
            return {"prompt_token_ids": self.token_ids}
        return {"messages": self.messages}


@dataclass(slots=True)
class ParsedRequest:
    kind: Kind
    model: str
    prompts: list[Prompt]
    sampling: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    logprobs: bool  # the response carries logprobs
    max_tokens_given: bool  # False: ``sampling.max_tokens`` is the gateway's default
    echo: bool = False  # the output starts with each prompt's ``echo_text`` (a token-id prompt's: its text)
    created: int = field(default_factory=lambda: int(time.time()))

    def choice_sampling(self, choice: int) -> SamplingParams:
        """Sampling of choice ``choice`` of a prompt: choices differ by seed (seed + choice)."""
        if choice == 0 or self.sampling.seed is None:
            return self.sampling
        return msgspec.structs.replace(self.sampling, seed=(self.sampling.seed + choice) & INT64_MAX)

    def echo_text(self, index: int) -> str:
        """What choice ``index`` (of all prompts) starts with: its prompt's ``echo_text``."""
        return self.prompts[index // self.n].echo_text


_PATH = re.compile(r"at `\$\.?([^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]+)`")


def decode_body(body: bytes, cls: type):
    """``body`` as a ``cls`` struct; a 400 naming the bad or missing field, or saying the JSON is invalid
    or nested too deeply for the decoder's recursion limit, otherwise."""
    try:
        return msgspec.json.decode(body, type=cls, strict=True)
    except msgspec.ValidationError as e:
        text = str(e)
        missing = _MISSING.search(text)
        path = _PATH.search(text)
        param = (path.group(1) if path else None) or None
        if missing:
            param = f"{param}.{missing.group(1)}" if param else missing.group(1)
            raise invalid(f"'{param}' is required", param, "missing_required_parameter") from None
        raise invalid(f"invalid type: {text}", param, "invalid_type") from None
    except msgspec.DecodeError as e:
        raise invalid(f"request body is not valid JSON: {e}", None, "invalid_json") from None
    except RecursionError:  # msgspec's guard against deep nesting, raised before the C stack runs out
        raise invalid("request body nests arrays or objects too deeply", None, "invalid_json") from None


def _check_int(value: int, name: str, lo: int, hi: int = INT64_MAX) -> None:
    if not lo <= value <= hi:
        bound = f">= {lo}" if hi == INT64_MAX else f"in {lo}..{hi}"
        raise invalid(f"'{name}' must be {bound}, got {value}", name)


def _stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise invalid(f"'stop' may hold at most {MAX_STOP} strings, got {len(stops)}", "stop")
    if any(s == "" for s in stops):
        raise invalid("'stop' strings must not be empty", "stop")
    return stops


def _sampling(req: CommonFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
    _check_int(max_tokens, "max_tokens", 1)
    if req.temperature is not None and not req.temperature >= 0:
        raise invalid(f"'temperature' must be >= 0, got {req.temperature}", "temperature")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise invalid(f"'top_p' must be in (0, 1], got {req.top_p}", "top_p")
    top_k = 0 if req.top_k in (None, -1) else req.top_k
    _check_int(top_k, "top_k", 0)
    if req.seed is not None:
        _check_int(req.seed, "seed", -(INT64_MAX + 1))
    if _not_built(req) != _NONE_GIVEN:  # the usual case, every one absent, in one comparison
        for name, neutral in NOT_BUILT.items():
            if getattr(req, name) not in (None, neutral):
                only = f" (only {neutral})" if isinstance(neutral, (int, float)) else ""
                raise invalid(f"'{name}' is not supported{only}", name, "unsupported_parameter")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=top_k,
        seed=None if req.seed is None else req.seed & INT64_MAX,
        stop=_stop_list(req.stop),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
    )


def _check_common(req: CommonFields, max_n: int) -> None:
    if req.model == "":
        raise invalid("'model' must not be empty", "model")
    _check_int(req.n, "n", 1, max_n)
    if req.response_format is not None and req.response_format.type != "text":
        raise invalid(f"response_format type {req.response_format.type!r} is not supported (only 'text': no "
                      "constrained decoding)", "response_format", "unsupported_parameter")


def _prompts(prompt: str | list | None) -> list[Prompt]:
    """A completion's ``prompt``: a string, token ids, or a list of either (a batch)."""
    if prompt is None:
        raise invalid("'prompt' is required", "prompt", "missing_required_parameter")
    if isinstance(prompt, str):
        items: list = [prompt]
    elif prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        items = [prompt]
    else:
        items = prompt
    if not items:
        raise invalid("'prompt' must not be empty", "prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            if item == "":
                raise invalid("'prompt' must not be empty", "prompt")
            out.append(Prompt(text=item))
        elif isinstance(item, list) and item and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= INT64_MAX for t in item
        ):
            out.append(Prompt(token_ids=item))
        else:
            raise invalid("'prompt' must be a string, a list of token ids (ints >= 0), or a non-empty "
                          "list of either", "prompt", "invalid_type")
    return out


def parse_completion(body: bytes, *, default_max_tokens: int, max_n: int) -> ParsedRequest:
    """Validate a ``/v1/completions`` body."""
    req = decode_body(body, CompletionRequest)
    _check_common(req, max_n)
    if req.echo and req.logprobs is not None:
        raise invalid("'echo' with 'logprobs' is not supported (prompt logprobs are not computed)", "echo",
                      "unsupported_parameter")
    if req.suffix:
        raise invalid("'suffix' is not supported", "suffix", "unsupported_parameter")
    if req.best_of not in (None, 1) and req.best_of != req.n:
        raise invalid("'best_of' other than n is not supported", "best_of", "unsupported_parameter")
    if req.logprobs is not None:
        _check_int(req.logprobs, "logprobs", 0, MAX_LOGPROBS)
    prompts = _prompts(req.prompt)
    if req.echo:
        for p in prompts:
            p.echo_text = p.text or ""  # a token-id prompt's text comes from the model's tokenizer
    max_tokens = default_max_tokens if req.max_tokens is None else req.max_tokens
    return ParsedRequest(
        kind="completion",
        model=req.model,
        prompts=prompts,
        sampling=_sampling(req, max_tokens, req.logprobs),
        n=req.n,
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        logprobs=req.logprobs is not None,
        max_tokens_given=req.max_tokens is not None,
        echo=req.echo,
    )


def chat_message(i: int, m: ChatMessageIn) -> ChatMessage:
    """Message ``i`` of a request, validated (text parts joined)."""
    if m.role not in CHAT_ROLES:
        raise invalid(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {m.role!r}",
                      f"messages[{i}].role")
    if m.content is None:
        raise invalid(f"messages[{i}].content is required", f"messages[{i}].content",
                      "missing_required_parameter")
    if isinstance(m.content, str):
        return ChatMessage(role=m.role, content=m.content)
    parts = []
    for j, part in enumerate(m.content):
        if part.type != "text" or part.text is None:
            raise invalid(f"messages[{i}].content[{j}]: only text parts are supported, got {part.type!r}",
                          f"messages[{i}].content[{j}]", "unsupported_parameter")
        parts.append(part.text)
    return ChatMessage(role=m.role, content="".join(parts))


def parse_chat(body: bytes, *, default_max_tokens: int, max_n: int) -> ParsedRequest:
    """Validate a ``/v1/chat/completions`` body."""
    req = decode_body(body, ChatCompletionRequest)
    _check_common(req, max_n)
    if not req.messages:
        raise invalid("'messages' is required and must not be empty", "messages",
                      "missing_required_parameter" if req.messages is None else "invalid_value")
    if req.tools:
        raise invalid("'tools' is not supported", "tools", "unsupported_parameter")
    if req.top_logprobs is not None:
        _check_int(req.top_logprobs, "top_logprobs", 0, MAX_LOGPROBS)
        if not req.logprobs:
            raise invalid("'top_logprobs' needs 'logprobs' set to true", "top_logprobs")
    messages = [chat_message(i, m) for i, m in enumerate(req.messages)]
    given = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if req.max_completion_tokens is not None:
        _check_int(req.max_completion_tokens, "max_completion_tokens", 1)
    last = messages[-1]
    echo = last.content if req.echo and last.role == "assistant" else ""  # as vLLM: the reply's own role only
    return ParsedRequest(
        kind="chat",
        model=req.model,
        prompts=[Prompt(messages=messages, echo_text=echo)],
        sampling=_sampling(req, default_max_tokens if given is None else given,
                           (req.top_logprobs or 0) if req.logprobs else None),
        n=req.n,
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        logprobs=req.logprobs,
        max_tokens_given=given is not None,
    )


# --------------------------------------------------------------------------- #
# Responses
# --------------------------------------------------------------------------- #


def token_string(token_id: int, chosen: dict[int, str]) -> str:
    return chosen.get(token_id, f"token_id:{token_id}")


def _top_names(lp: TokenLogprob, tok: str) -> dict[int, str]:
    """Token id -> string for the chosen token and its alternatives."""
    names = dict(zip((t for t, _ in lp.top), lp.top_tokens))
    names[lp.token_id] = tok
    return names


def completion_logprobs(entries: list[tuple[TokenLogprob, str]], offset: int) -> dict:
    """The legacy completions ``logprobs`` object for ``(logprob, token string)`` pairs."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for lp, tok in entries:
        tokens.append(tok)
        token_logprobs.append(lp.logprob)
        names = _top_names(lp, tok)
        top.append({token_string(t, names): v for t, v in lp.top})
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(entries: list[tuple[TokenLogprob, str]]) -> dict:
    """The chat ``logprobs`` object for ``(logprob, token string)`` pairs."""
    content = []
    for lp, tok in entries:
        names = _top_names(lp, tok)
        top = []
        for t, v in lp.top:
            s = token_string(t, names)
            top.append({"token": s, "logprob": v, "bytes": list(s.encode())})
        content.append({"token": tok, "logprob": lp.logprob, "bytes": list(tok.encode()), "top_logprobs": top})
    return {"content": content, "refusal": None}


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def response_id(kind: Kind, request_id: str) -> str:
    return ("cmpl-" if kind == "completion" else "chatcmpl-") + request_id


def full_choice(kind: Kind, index: int, text: str, finish_reason: str, logprobs: dict | None) -> dict:
    if kind == "completion":
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"index": index, "message": {"role": "assistant", "content": text},
            "logprobs": logprobs, "finish_reason": finish_reason}


def full_response(req: ParsedRequest, request_id: str, choices: list[dict], usage: dict) -> dict:
    return {
        "id": response_id(req.kind, request_id),
        "object": "text_completion" if req.kind == "completion" else "chat.completion",
        "created": req.created,
        "model": req.model,
        "choices": choices,
        "usage": usage,
    }


def chunk_choice(kind: Kind, index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    """One streamed piece of choice ``index``; a chat stream announces the role before (``role_chunk_choice``)."""
    if kind == "completion":
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"index": index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": finish_reason}


def role_chunk_choice(index: int) -> dict:
    """The role-only opening of chat choice ``index``, carrying no token (as OpenAI, vLLM and SGLang send it)."""
    return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}


def chunk(req: ParsedRequest, request_id: str, choices: list[dict], usage: dict | None = None) -> dict:
    out = {
        "id": response_id(req.kind, request_id),
        "object": "text_completion" if req.kind == "completion" else "chat.completion.chunk",
        "created": req.created,
        "model": req.model,
        "choices": choices,
    }
    if req.include_usage:
        out["usage"] = usage
    return out
