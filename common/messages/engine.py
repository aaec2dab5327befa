"""Engine requests (an engine's request socket) and their replies: generate, abort, stats, tokenize."""

from __future__ import annotations

import msgspec

from common.messages.base import Load, Message, Role


class SamplingParams(msgspec.Struct, omit_defaults=True):
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k >= 0: chosen token + top-k


class ChatMessage(msgspec.Struct, omit_defaults=True):
    role: str
    content: str


class TokenLogprob(msgspec.Struct, omit_defaults=True):
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = []  # (token_id, logprob), best first
    token: str = ""  # the token's text, as the engine's tokenizer decodes it alone
    top_tokens: list[str] = []  # texts of ``top``, same order


class KVTransferParams(msgspec.Struct, omit_defaults=True):
    """What prefill hands back so that a decode engine can read the prompt's KV."""

    engine_id: str
    kv_endpoint: str
    transfer_id: str
    block_ids: list[int]
    num_tokens: int
    first_token_id: int
    lease_expiry: float  # unix time; prefill frees the blocks after it unless renewed
    first_token_logprob: TokenLogprob | None = None
    incarnation: str = ""  # names the prefill's KV memory, as its handshake does: a restarted prefill's differs
    block_size: int = 0  # tokens per block of ``block_ids`` (the prefill's); 0: the decode's own (older senders)
    tensor_parallel_size: int = 1  # the prefill instance's ranks, each holding its slice of the KV heads
    lease_slot: int = -1  # the lease's slot in the prefill's lease table (handshake ``lease_table``); -1: none
    lease_generation: int = 0  # the slot's generation while this lease holds it (a same-host reader checks it)


class PushTarget(msgspec.Struct, omit_defaults=True):
    """Push mode: decode's pre-allocated blocks for a prompt, held under its lease ``transfer_id`` (protocol.md)."""

    engine_id: str
    kv_endpoint: str
    transfer_id: str
    block_ids: list[int]  # decode's blocks for the prompt's tokens, ``block_size`` tokens each
    num_tokens: int  # the prompt's
    num_cached_tokens: int  # leading tokens decode already holds (prefix-cache hits): not written
    block_size: int
    lease_expiry: float  # unix time; decode frees the blocks after it unless confirmed
    incarnation: str = ""
    tensor_parallel_size: int = 1


class Generate(Message):
    """Run a request.  Exactly one of ``prompt``, ``prompt_token_ids``, ``messages``.

    ``do_remote_decode``: prefill only — stop after the first token and pin the
    prompt's blocks for a decode engine.  ``remote_prefill``: decode only — read
    the prompt's KV from that prefill engine instead of computing it.
    Push mode: ``await_push`` (decode: answer a ``PushTarget``, decode once pushed), ``push_to`` (prefill).
    The engine streams ``TokenOutput`` messages; the last has ``finish_reason``.
    """

    request_id: str
    sampling: SamplingParams
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[ChatMessage] | None = None
    do_remote_decode: bool = False
    remote_prefill: KVTransferParams | None = None
    await_push: bool = False
    push_to: PushTarget | None = None


def gives_one_prompt(msg: Generate) -> bool:
    """The rule every engine applies: exactly one of ``prompt``, ``prompt_token_ids``, ``messages``."""
    return sum(x is not None for x in (msg.prompt, msg.prompt_token_ids, msg.messages)) == 1


class Usage(msgspec.Struct, omit_defaults=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


class TokenOutput(Message):
    """A streamed piece of a request's output."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "remote_decode"
    usage: Usage | None = None  # on the final output
    prompt_token_ids: list[int] | None = None  # on the first output of a prefill
    kv_transfer: KVTransferParams | None = None  # prefill with do_remote_decode
    push_target: PushTarget | None = None  # decode with await_push: the first output, before any token
    timings: dict[str, float] | None = None  # named durations in seconds (queue, prefill, ...)


class Abort(Message):
    request_id: str


class GetStats(Message):
    pass


class Tokenize(Message):
    """The token ids the engine's tokenizer gives ``prompt`` or ``messages`` (exactly one; messages rendered
    by the chat template, as ``Generate`` renders them with the defaults).  Answered with ``Tokenized``."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class Tokenized(Message):
    token_ids: list[int]
    max_model_len: int
    token_strs: list[str] | None = None  # the vocabulary string of each id, when asked


class Detokenize(Message):
    """The text of ``token_ids`` (special tokens kept, as vLLM's ``/detokenize`` gives it).  Answered with
    ``Detokenized``."""

    token_ids: list[int]


class Detokenized(Message):
    text: str


class EngineStats(Message):
    instance_id: str
    role: Role
    load: Load
    num_requests_finished: int = 0
    num_transfers_active: int = 0
    kv_transports: dict[str, str] = {}  # decode: prefill engine id -> the KV transport chosen for it
    num_preemptions: int = 0  # sequences preempted (their blocks freed, recomputed later) since the engine started
