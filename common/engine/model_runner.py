"""Turns one scheduled step into a forward pass over the paged KV cache."""

from __future__ import annotations

import torch

from common.engine.attention import AttentionMetadata
from common.engine.kv_cache import KVCache
from common.engine.model import CausalLM
from common.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: CausalLM, kv_cache: KVCache, device: torch.device):
        self.model = model
        self.kv_cache = kv_cache
        self.device = device

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]], sample: list[bool]) -> torch.Tensor | None:
        """Compute each sequence's ``n`` tokens from ``num_computed_tokens`` on (writing their KV);
        returns float32 logits of the last token of every sequence with ``sample`` set (None if none)."""
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            input_ids += seq.token_ids[start : start + n]
            positions += range(start, start + n)
            query_lens.append(n)
            context_lens.append(start + n)
        meta = AttentionMetadata.build(
            query_lens, context_lens, [seq.block_table for seq, _ in scheduled], self.kv_cache.block_size, self.device
        )
        ids = torch.tensor(input_ids, dtype=torch.int64).to(self.device, non_blocking=True)
        pos = torch.tensor(positions, dtype=torch.int64).to(self.device, non_blocking=True)
        hidden = self.model(ids, pos, meta, self.kv_cache)
        if not any(sample):
            return None
        last = meta.query_start_loc[1:] - 1
        if not all(sample):
            last = last[torch.tensor(sample, device=self.device)]
        return self.model.compute_logits(hidden[last])
