"""Push mode in the engine: prefill reports each step's new prompt KV, decode gets the first token last.

Prefill: a sequence added with a ``KVPush`` hears, on the engine thread after every step that
computed some of its prompt, which prompt tokens' KV landed in which blocks (``report_pushes``):
per chunk under chunked prefill, prefix-cache hits included, from token 0 again after a preemption
(``Scheduler`` resets ``num_pushed_tokens``: the prompt is recomputed in other blocks).  On CUDA a
window comes with an event recorded after the step's kernels, which the writer waits for.

Decode: the request is allocated before prefill ran, without its first token (``RemoteRequest``
with ``first_token_id`` None); ``finish_pushed`` brings it once the KV landed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from common.engine.sequence import InvalidRequest

if TYPE_CHECKING:
    from common.engine.engine import LLMEngine
    from common.engine.sequence import Sequence


class KVPush(Protocol):
    """Where the engine reports a sequence's prompt KV as it lands in the cache."""

    def computed(self, start: int, end: int, block_ids: list[int], ready: torch.cuda.Event | None) -> None:
        """Engine thread: the KV of prompt tokens ``[start, end)`` is in ``block_ids`` (the sequence's block
        table) once ``ready`` (None: already) completed.  Must not block."""


def report_pushes(scheduled: list[tuple[Sequence, int]], device: torch.device) -> None:
    """After a step: hand each pushing sequence's prompt KV computed since its last report to its ``push``."""
    pushing = [seq for seq, _ in scheduled
               if seq.push is not None and seq.num_pushed_tokens < min(seq.num_computed_tokens, seq.num_prompt_tokens)]
    if not pushing:
        return
    ready = None
    if device.type == "cuda":
        ready = torch.cuda.Event()
        ready.record()
    for seq in pushing:
        end = min(seq.num_computed_tokens, seq.num_prompt_tokens)
        seq.push.computed(seq.num_pushed_tokens, end, list(seq.block_table), ready)
        seq.num_pushed_tokens = end


def finish_pushed(core: LLMEngine, request_id: str, first_token_id: int) -> bool:
    """Engine thread: the pushed KV of a request allocated without its first token landed; it decodes from
    ``first_token_id`` (``LLMEngine.finish_remote_kv``).  False if the request is gone."""
    seq = core.requests.get(request_id)
    if seq is None:
        return False
    if not 0 <= first_token_id < core.model_config.vocab_size:
        raise InvalidRequest(f"first_token_id {first_token_id} is outside the vocabulary", "first_token_id")
    seq.remote_first_token = first_token_id
    return core.finish_remote_kv(request_id, True)
