"""Turns one scheduled step into a forward pass over the paged KV cache."""

from __future__ import annotations

import torch

from common.engine.attention import AttentionMetadata
from common.engine.cuda_graph import DecodeGraphs
from common.engine.kv_cache import KVCache
from common.engine.model import CausalLM
from common.engine.sequence import Sequence


class ModelRunner:
    """Runs steps eagerly, except decode-only batches on CUDA, which replay ``DecodeGraphs``
    (unless ``enforce_eager``)."""

    def __init__(
        self,
        model: CausalLM,
        kv_cache: KVCache,
        device: torch.device,
        max_num_seqs: int,
        max_model_len: int,
        enforce_eager: bool = False,
    ):
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        use_graphs = device.type == "cuda" and not enforce_eager
        self.graphs = DecodeGraphs(model, kv_cache, max_num_seqs, max_model_len) if use_graphs else None

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
        tables = [seq.block_table for seq, _ in scheduled]
        decode_only = len(input_ids) == len(scheduled)
        if decode_only and self.graphs is not None and self.graphs.bucket(len(scheduled), max(context_lens)):
            hidden = self.graphs.run(input_ids, positions, tables)
            last = torch.arange(len(scheduled), device=self.device)
        else:
            meta = AttentionMetadata.build(query_lens, context_lens, tables, self.kv_cache.block_size, self.device)
            ids_pos = torch.tensor([input_ids, positions], dtype=torch.int64).to(self.device, non_blocking=True)
            hidden = self.model(ids_pos[0], ids_pos[1], meta, self.kv_cache)
            last = meta.query_start_loc[1:] - 1
        if not any(sample):
            return None
        if not all(sample):
            last = last[torch.tensor(sample, device=self.device)]
        return self.model.compute_logits(hidden[last])
