"""``InflightStep``: a launched step whose sampled ids may still be on their way to the host.

Async scheduling (``--async-scheduling``, vLLM v1's and SGLang's overlap) keeps one step in flight:
``LLMEngine.step`` launches step n (forward pass and sampling stay on the device), then processes step
n-1's ids on the host while step n runs.  The contract of a launched step:

- Placeholders: each sequence that samples in it gets ``placeholder(row)`` (a negative id naming its row of
  ``tokens``) appended to ``token_ids`` at launch; ``results`` hands back the real id with the index it
  replaces.  The next step, launched before that, takes such an input id from ``tokens`` on the device
  (``fill_pending``): no host sync.
- Finished meanwhile: a sequence that finishes (stop, length, abort) while a launched step still computes
  for it is not in ``results`` (its token there is discarded) and keeps its KV blocks; the step that
  retires last with it frees them (``release``), the only owner of those frees.
"""

from __future__ import annotations

import time

import torch

from common.engine.block_manager import BlockManager
from common.engine.sampler import Sampled
from common.engine.sequence import Sequence, SequenceStatus
from common.messages import TokenLogprob


def placeholder(row: int) -> int:
    """The id standing for row ``row`` of the in-flight step's sampled ids."""
    return -(row + 1)


def fill_pending(ids: torch.Tensor, pending: torch.Tensor) -> None:
    """On the device, in place: replace each ``placeholder(r)`` in ``ids`` by ``pending[r]``."""
    ids.copy_(torch.where(ids < 0, pending[(-1 - ids).clamp(min=0)], ids))


def computing_for(seq: Sequence, launched: list[InflightStep]) -> bool:
    """Whether a step of ``launched`` (still in flight) computes for ``seq``: its blocks must stay."""
    return any(seq in step.seqs for step in launched)


class InflightStep:
    def __init__(self, scheduled: list[tuple[Sequence, int]], sampling: list[Sequence], sampled: Sampled | None,
                 start: float):
        """After the step (launched at ``time.monotonic()`` ``start``) queued its kernels and sampling:
        append the placeholders, start the ids' copy."""
        self.start = start
        self.seqs = {seq for seq, _ in scheduled}
        self.prefilling = [seq for seq, _ in scheduled if seq.num_computed_tokens < seq.num_prompt_tokens]
        self.sampling = sampling
        self.indices = [len(seq.token_ids) for seq in sampling]
        for row, seq in enumerate(sampling):
            seq.token_ids.append(placeholder(row))
        self.tokens = sampled.tokens if sampled is not None else None  # on the device: the next step's inputs
        self.host = sampled.to_host() if sampled is not None else None  # pinned host copies
        self.ready: torch.cuda.Event | None = None
        if self.tokens is not None and self.tokens.device.type == "cuda":
            self.ready = torch.cuda.Event()
            self.ready.record()

    def results(self) -> list[tuple[Sequence, int, int, TokenLogprob | None]]:
        """Wait for the copy; ``(sequence, index of its placeholder, token id, logprob)`` of each sequence
        that sampled and is not finished.  Adds this step's time to its prefilling sequences."""
        if self.ready is not None:
            self.ready.synchronize()
        elapsed = time.monotonic() - self.start
        for seq in self.prefilling:
            seq.prefill_time += elapsed
        if self.host is None:
            return []
        tokens, logprobs = self.host.results()
        return [(seq, index, token, logprob)
                for seq, index, token, logprob in zip(self.sampling, self.indices, tokens, logprobs)
                if seq.status is not SequenceStatus.FINISHED]  # fmt: skip

    def release(self, block_manager: BlockManager, launched: list[InflightStep]) -> None:
        """After ``results``: free the blocks of its sequences that finished, unless a step of ``launched``
        (still in flight) computes for them too."""
        for seq in self.seqs:
            if seq.status is SequenceStatus.FINISHED and not computing_for(seq, launched):
                block_manager.free_seq(seq)
