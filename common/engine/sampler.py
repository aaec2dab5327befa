"""Next-token sampling for a batch: greedy, temperature, top-k, top-p, per-request seeds, logprobs.

Sampling draws ``argmax(probs / q)`` with ``q ~ Exponential(1)`` (the Gumbel-max
trick in another form), so a seeded request's draw depends only on its own
``torch.Generator`` and never on the rest of the batch.  Logprobs are the
``log_softmax`` of the raw logits (before temperature, top-k and top-p).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from common.engine.host_copies import to_device, to_host
from common.engine.kernels import sampling
from common.messages import SamplingParams, TokenLogprob


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature == 0 or params.top_k == 1


@dataclass
class Sampled:
    """One batch's sampled ids ``tokens`` ``[B]`` and, for the rows that asked (``logprob_ks[i]`` not None),
    the logprob of the sampled id (``chosen``) and the top ids and logprobs, rows in that order."""

    tokens: torch.Tensor
    logprob_ks: list[int | None]
    chosen: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_vals: torch.Tensor | None = None

    def to_host(self) -> "Sampled":
        """The same in pinned host memory (``host_copies.to_host``: wait for the stream before ``results``)."""
        return replace(self, tokens=to_host(self.tokens), chosen=to_host(self.chosen),
                       top_ids=to_host(self.top_ids), top_vals=to_host(self.top_vals))

    def results(self) -> tuple[list[int], list[TokenLogprob | None]]:
        """Per row its token id and its ``TokenLogprob`` where asked (a host sync if still on the device)."""
        token_list = self.tokens.tolist()
        result: list[TokenLogprob | None] = [None] * len(token_list)
        if self.chosen is None:
            return token_list, result
        rows = [i for i, k in enumerate(self.logprob_ks) if k is not None]
        chosen, top_ids, top_vals = self.chosen.tolist(), self.top_ids.tolist(), self.top_vals.tolist()
        for j, i in enumerate(rows):
            n = self.logprob_ks[i]
            result[i] = TokenLogprob(
                token_id=token_list[i], logprob=chosen[j], top=list(zip(top_ids[j][:n], top_vals[j][:n]))
            )
        return token_list, result


class Sampler:
    def __init__(self, seed: int, device: torch.device):
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def request_generator(self, seed: int) -> torch.Generator:
        """A generator owned by one request (same seed -> same draws)."""
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        return gen

    def skip_draw(self, generator: torch.Generator, params: SamplingParams, vocab_size: int) -> None:
        """Advance a request's generator past the draw of one token sampled elsewhere (the prefill's
        first token), so a seeded request continues exactly as it would have colocated."""
        if not is_greedy(params):
            torch.empty(vocab_size, device=self.device).exponential_(generator=generator)

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """``logits`` float32 ``[B, vocab]`` -> one token id per row, and its logprobs where asked."""
        return self.sample(logits, params, generators).results()

    @torch.inference_mode()
    def sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> Sampled:
        """``__call__`` without leaving the device: no host sync."""
        greedy = [is_greedy(p) for p in params]
        if all(greedy):  # on CUDA a split reduction: torch's argmax of one long row runs on a few blocks
            tokens = sampling.argmax(logits) if logits.is_cuda and sampling.available() else logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, params, generators, greedy)
        return self._logprobs(logits, params, tokens)

    def _sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        greedy: list[bool],
    ) -> torch.Tensor:
        device = logits.device
        temps = to_device([1.0 if g else p.temperature for p, g in zip(params, greedy)], torch.float32, device)
        scaled = logits / temps[:, None]
        vocab = logits.shape[-1]
        top_ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_ps = [p.top_p for p in params]
        if min(top_ks) < vocab or min(top_ps) < 1.0:
            sorted_logits, order = scaled.sort(dim=-1, descending=True)
            rank = torch.arange(vocab, device=logits.device)[None, :]
            drop = rank >= to_device(top_ks, torch.int64, device)[:, None]
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            probs = sorted_logits.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs
            drop = mass_before >= to_device(top_ps, torch.float32, device)[:, None]
            drop[:, 0] = False
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            scaled = torch.empty_like(scaled).scatter_(-1, order, sorted_logits)
        probs = scaled.softmax(dim=-1)
        q = torch.empty_like(probs)
        q.exponential_(generator=self.generator)
        for row, gen in enumerate(generators):
            if gen is not None and not greedy[row]:  # one draw of vocab_size per sampled token
                q[row].exponential_(generator=gen)
        sampled = (probs / q).argmax(dim=-1)
        if any(greedy):
            is_greedy = to_device(greedy, torch.bool, device)
            sampled = torch.where(is_greedy, logits.argmax(dim=-1), sampled)
        return sampled

    def _logprobs(self, logits: torch.Tensor, params: list[SamplingParams], tokens: torch.Tensor) -> Sampled:
        """Logprobs (``log_softmax`` of the raw logits) of the sampled ids and the top ones, where asked."""
        sampled = Sampled(tokens, [p.logprobs for p in params])
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if not rows:
            return sampled
        index = to_device(rows, torch.int64, logits.device)
        logprobs = logits[index].log_softmax(dim=-1)
        sampled.chosen = logprobs.gather(-1, tokens[index][:, None])[:, 0]
        k = min(max(params[i].logprobs for i in rows), logprobs.shape[-1])  # type: ignore[type-var]
        sampled.top_vals, sampled.top_ids = logprobs.topk(k, dim=-1)
        return sampled
