"""Push mode in the engine: prefill reports each step's new prompt KV, decode gets the first token last.

Prefill: a sequence added with a ``KVPush`` hears, on the engine thread after every step that
computed some of its prompt, which prompt tokens' KV landed in which blocks (``report_pushes``):
per chunk under chunked prefill, prefix-cache hits included, from token 0 again after a preemption
(``Scheduler`` resets ``num_pushed_tokens``: the prompt is recomputed in other blocks).  On CUDA a
window comes with an event recorded after the step's kernels, which the writer waits for.

Decode: the request is allocated before prefill ran, without its first token (``RemoteRequest``
with ``first_token_id`` None); ``AsyncEngine.finish_pushed`` brings it once the KV landed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from common.engine.sequence import Sequence


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
