"""PyTorch references of ``paged_attention``'s and ``decode_attention``'s kernels, on the same cache layout: what
the CPU path and the tests compare against.  They share the kernels' signatures (less the tuning keywords), compute
in fp32, and loop over sequences on the host."""

from __future__ import annotations

import torch


def write_kv_reference(
    kv_data: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
    source_rows: torch.Tensor | None = None,
) -> None:
    """``write_kv`` in PyTorch."""
    if source_rows is not None:
        k, v = k[source_rows], v[source_rows]
    block_size = kv_data.shape[2]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    for kind, rows in enumerate((k, v)):
        kv_data[:, :, :, layer, kind][blocks, :, offsets] = rows.to(kv_data.dtype)


def decode_attention_reference(
    q: torch.Tensor,
    kv_data: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """``decode_attention`` in PyTorch: one query per sequence, at its last position."""
    starts = torch.arange(q.shape[0] + 1, device=q.device)
    return prefill_attention_reference(q, kv_data, layer, block_tables, starts, context_lens, scale, sliding_window)


def prefill_attention_reference(
    q: torch.Tensor,
    kv_data: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """``prefill_attention`` in PyTorch (fp32 math), one sequence at a time over its gathered K/V."""
    _, num_kv_heads, block_size, _, _, head_dim = kv_data.shape
    group = q.shape[1] // num_kv_heads
    out = torch.empty_like(q)
    starts, ctx_lens = query_start_loc.tolist(), context_lens.tolist()
    for i, context_len in enumerate(ctx_lens):
        first, last = starts[i], starts[i + 1]
        blocks = block_tables[i, : (context_len + block_size - 1) // block_size].long()
        keys, values = (
            kv_data[blocks, :, :, layer, kind].transpose(0, 1).reshape(num_kv_heads, -1, head_dim)[:, :context_len]
            .float().repeat_interleave(group, 0)  # [H, context_len, D]
            for kind in (0, 1)
        )  # fmt: skip
        query_pos = torch.arange(context_len - (last - first), context_len, device=q.device)[:, None]
        key_pos = torch.arange(context_len, device=q.device)[None, :]
        allowed = key_pos <= query_pos
        if sliding_window is not None:
            allowed &= key_pos > query_pos - sliding_window
        scores = torch.einsum("qhd,hkd->hqk", q[first:last].float(), keys) * scale
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[first:last] = torch.einsum("hqk,hkd->qhd", probs, values).to(q.dtype)
    return out
