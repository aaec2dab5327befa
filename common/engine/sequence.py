"""One request's state inside the engine, and what a step reports about it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import TYPE_CHECKING, Protocol

import torch

from common.errors import PdserveError
from common.messages import SamplingParams, TokenLogprob, Usage

if TYPE_CHECKING:
    from common.engine.detokenizer import Detokenizer


class InvalidRequest(PdserveError):
    """A request the engine refuses at add time; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class NoFreeBlocks(PdserveError):
    """Not enough free KV blocks right now for a remote request (retry after blocks free)."""


class KVPush(Protocol):
    """Where the engine reports a sequence's prompt KV as it lands in the cache (push mode's prefill;
    ``common.engine.kv_push``)."""

    def computed(self, start: int, end: int, block_ids: list[int], ready: torch.cuda.Event | None) -> None:
        """Engine thread: the KV of prompt tokens ``[start, end)`` is in ``block_ids`` (the sequence's block
        table) once ``ready`` (None: already) completed.  Must not block."""


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    WAITING_FOR_REMOTE_KVS = auto()
    FINISHED = auto()


@dataclass
class RemoteAllocation:
    """Local blocks for a remote prefill's KV: read remote blocks ``[num_cached_blocks:]``
    into ``block_ids[num_cached_blocks:]``; the leading ones are prefix-cache hits."""

    block_ids: list[int]
    num_cached_blocks: int


@dataclass
class RemoteRequest:
    """A request whose prompt KV a remote prefill computed: decode allocates blocks for
    ``num_remote_tokens`` prompt tokens plus the prefill's ``first_token_id`` (None in push mode,
    where the blocks are allocated first: ``finish_remote_kv`` brings it)."""

    request_id: str
    prompt_token_ids: list[int]
    first_token_id: int | None
    sampling: SamplingParams
    num_remote_tokens: int


@dataclass
class RequestOutput:
    """What one step produced for one request (``text`` and ``new_token_ids`` are deltas)."""

    request_id: str
    new_token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # stop | length | abort | remote_decode | error
    usage: Usage | None = None  # on the final output
    timings: dict[str, float] | None = None  # on the final output: queue, prefill, first_token (seconds)
    pinned_block_ids: list[int] | None = None  # finish_reason "remote_decode": blocks pinned for transfer
    num_cached_tokens: int = 0
    error: str | None = None  # finish_reason "error": why

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class Sequence:
    """Token ids plus how many of them have KV in the cache (``num_computed_tokens``)."""

    request_id: str
    token_ids: list[int]
    sampling: SamplingParams
    pin_for_transfer: str | None = None
    push: KVPush | None = None  # push mode: told of each step's new prompt KV (``common.engine.kv_push``)
    num_pushed_tokens: int = 0  # prompt tokens whose KV was handed to ``push`` in this pass
    generator: torch.Generator | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hashes of the leading full blocks registered so far
    prompt_hashes: list[int] = field(default_factory=list)  # the prompt's full blocks' hash chain, when computed ahead
    num_prompt_tokens: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    prefill_time: float = 0.0  # seconds of steps spent computing this request's prompt
    remote_first_token: int | None = None  # decode of a remote prefill: the prefill's first token
    kv_ready_time: float | None = None  # decode of a remote prefill: when finish_remote_kv came
    detokenizer: Detokenizer | None = None
    max_num_tokens: int = 0  # prompt + max_tokens, at most max_model_len (set by the engine)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)
        self.max_num_tokens = self.max_num_tokens or self.num_prompt_tokens + self.sampling.max_tokens

    @property
    def final_token_pending(self) -> bool:
        """Its last token id is still on the device (async scheduling: a placeholder, ``InflightStep``) and
        is its last: ``max_num_tokens`` reached, or a prefill for a remote decode (done after one token)."""
        if not self.token_ids or self.token_ids[-1] >= 0:
            return False
        return self.pin_for_transfer is not None or self.num_tokens >= self.max_num_tokens

    def drop_pending(self) -> None:
        """Finished: forget the placeholders of tokens still on the device (they are never emitted)."""
        while self.token_ids and self.token_ids[-1] < 0:
            self.token_ids.pop()

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def timings(self) -> dict[str, float]:
        """Seconds from arrival: ``queue_s`` (to first scheduled), ``first_token_s``, ``remote_kv_s``
        (to the remote KV's arrival); ``prefill_s``: compute time of the prompt's steps.
        The names are the wire names of ``TokenOutput.timings`` (docs/protocol.md)."""
        out = {"prefill_s": self.prefill_time}
        for name, t in (
            ("queue_s", self.first_scheduled_time),
            ("first_token_s", self.first_token_time),
            ("remote_kv_s", self.kv_ready_time),
        ):
            if t is not None:
                out[name] = t - self.arrival_time
        return out
