"""Paged attention over the block-major KV cache, in plain PyTorch (exact, any device)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """A batch of B sequences whose new tokens are flattened in order (N tokens total).

    Sequence ``b`` computes ``query_lens[b]`` new tokens at positions
    ``[context_lens[b] - query_lens[b], context_lens[b])``; its K/V for every position
    live in the blocks ``block_tables[b]``.  ``token_seq_ids``/``token_offsets`` (which
    sequence each new token belongs to, and its index among that sequence's new tokens)
    are derived once here and shared by every layer.
    """

    query_start_loc: torch.Tensor  # int64 [B+1], cumulative new-token counts
    context_lens: torch.Tensor  # int64 [B], tokens in the cache after this step (computed before + new)
    block_tables: torch.Tensor  # int64 [B, max_blocks] block ids, padded with 0
    slot_mapping: torch.Tensor  # int64 [N] flat slot (block_id * block_size + offset) of each new token
    max_query_len: int
    max_context_len: int
    query_lens: torch.Tensor = field(init=False, repr=False)
    token_seq_ids: torch.Tensor = field(init=False, repr=False)
    token_offsets: torch.Tensor = field(init=False, repr=False)
    _masks: dict[int | None, torch.Tensor] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        device = self.query_start_loc.device
        num_tokens = self.slot_mapping.numel()
        num_seqs = self.context_lens.numel()
        self.query_lens = self.query_start_loc[1:] - self.query_start_loc[:-1]
        self.token_seq_ids = torch.repeat_interleave(
            torch.arange(num_seqs, device=device), self.query_lens, output_size=num_tokens
        )
        self.token_offsets = torch.arange(num_tokens, device=device) - self.query_start_loc[self.token_seq_ids]

    @property
    def num_seqs(self) -> int:
        return self.context_lens.numel()

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str,
    ) -> "AttentionMetadata":
        """Index math for one step; raises ``ValueError`` on inconsistent inputs."""
        if not (len(query_lens) == len(context_lens) == len(block_tables)) or not query_lens:
            raise ValueError(
                f"AttentionMetadata: need one query_len, context_len and block table per sequence, got "
                f"{len(query_lens)}, {len(context_lens)}, {len(block_tables)}"
            )
        if block_size <= 0:
            raise ValueError(f"AttentionMetadata: block_size must be > 0, got {block_size}")
        for i, (q, c, table) in enumerate(zip(query_lens, context_lens, block_tables)):
            if q < 1 or c < q:
                raise ValueError(f"AttentionMetadata: sequence {i} needs 1 <= query_len <= context_len, got {q}, {c}")
            if len(table) * block_size < c:
                raise ValueError(
                    f"AttentionMetadata: sequence {i} has {c} tokens but only {len(table)} blocks of {block_size}"
                )
        max_blocks = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in block_tables], dtype=torch.int64)
        q_lens = torch.tensor(query_lens, dtype=torch.int64)
        ctx_lens = torch.tensor(context_lens, dtype=torch.int64)
        query_start_loc = torch.zeros(len(query_lens) + 1, dtype=torch.int64)
        torch.cumsum(q_lens, 0, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])
        seq_ids = torch.repeat_interleave(torch.arange(len(query_lens)), q_lens, output_size=num_tokens)
        positions = (ctx_lens - q_lens)[seq_ids] + torch.arange(num_tokens) - query_start_loc[seq_ids]
        slots = tables[seq_ids, positions // block_size] * block_size + positions % block_size
        return cls(
            query_start_loc=query_start_loc.to(device),
            context_lens=ctx_lens.to(device),
            block_tables=tables.to(device),
            slot_mapping=slots.to(device),
            max_query_len=max(query_lens),
            max_context_len=max(context_lens),
        )

    def attention_mask(self, sliding_window: int | None = None) -> torch.Tensor:
        """Bool ``[B, 1, max_query_len, max_context_len]``: True where a query may attend a key.

        Causal with each sequence's offset, keys beyond its context masked out, and with
        ``sliding_window`` W only keys ``k > q - W`` kept (as HF).  Padded query rows copy
        the sequence's last real row so that no row is empty.
        """
        if sliding_window not in self._masks:
            device = self.context_lens.device
            key = torch.arange(self.max_context_len, device=device)[None, None, :]
            last = (self.context_lens - 1)[:, None, None]
            query_pos = (self.context_lens - self.query_lens)[:, None, None] + torch.arange(
                self.max_query_len, device=device
            )[None, :, None]
            query_pos = torch.minimum(query_pos, last)
            mask = key <= query_pos
            if sliding_window is not None:
                mask &= key > query_pos - sliding_window
            self._masks[sliding_window] = mask[:, None]
        return self._masks[sliding_window]


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Write the new ``k``/``v`` ``[N, Hkv, D]`` at ``meta.slot_mapping``, then attend.

    ``q`` is ``[N, H, D]``; each sequence attends causally to its whole context (cached
    plus new) gathered from ``k_cache``/``v_cache`` ``[num_blocks, block_size, Hkv, D]``.
    Returns ``[N, H, D]``.
    """
    block_size = k_cache.shape[1]
    slots = meta.slot_mapping
    block_ids, offsets = slots // block_size, slots % block_size
    k_cache[block_ids, offsets] = k
    v_cache[block_ids, offsets] = v

    num_blocks = -(-meta.max_context_len // block_size)
    tables = meta.block_tables[:, :num_blocks]
    keys = k_cache[tables].flatten(1, 2)[:, : meta.max_context_len]  # [B, K, Hkv, D]
    values = v_cache[tables].flatten(1, 2)[:, : meta.max_context_len]

    decode_only = meta.max_query_len == 1
    if decode_only:
        queries = q[:, None]  # [B, 1, H, D]
    else:
        queries = q.new_zeros(meta.num_seqs, meta.max_query_len, q.shape[1], q.shape[2])
        queries[meta.token_seq_ids, meta.token_offsets] = q
    out = F.scaled_dot_product_attention(
        queries.transpose(1, 2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=meta.attention_mask(sliding_window),
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    ).transpose(1, 2)  # [B, Q, H, D]
    if decode_only:
        return out[:, 0]
    return out[meta.token_seq_ids, meta.token_offsets]
