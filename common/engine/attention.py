"""Paged attention over the head-major KV cache: plain PyTorch (``paged_attention``: exact, any
device), or the Triton kernels reading the blocks in place (``rotary_paged_attention_triton``).

Everything derived from a step's metadata (gather indices, cache rows, masks) is computed
once per step and shared by every layer; on CUDA it is also what a decode CUDA graph
records (no host synchronisation anywhere on the decode path).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common.arith import ceil_div
from common.engine.host_copies import to_device, to_device_aligned
from common.engine.kernels import decode_attention, rotary
from common.engine.kernels import paged_attention as kernels
from common.engine.kv_cache import KVCache

# cuDNN's SDPA builds a new plan for every new shape: on an H100 ~35 ms of CPU once per
# decode step (the key length grows by one) and once per new prefill length.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class AttentionMetadata:
    """A batch of B sequences whose new tokens are flattened in order (N tokens total).

    Sequence ``b`` computes ``query_lens[b]`` new tokens at positions
    ``[context_lens[b] - query_lens[b], context_lens[b])``; its K/V for every position
    live in the blocks ``block_tables[b]``.  ``kv_source_rows`` (CUDA-graph padding only):
    the K/V written at token ``i``'s slot come from token ``kv_source_rows[i]``, so that
    padded rows rewrite a real row's slot with that row's own values.
    """

    query_start_loc: torch.Tensor  # int64 [B+1], cumulative new-token counts
    context_lens: torch.Tensor  # int64 [B], tokens in the cache after this step (computed before + new)
    block_tables: torch.Tensor  # int64 [B, max_blocks] block ids, padded with 0
    slot_mapping: torch.Tensor  # int64 [N] flat slot (block_id * block_size + offset) of each new token
    max_query_len: int
    max_context_len: int
    kv_source_rows: torch.Tensor | None = None  # int64 [N]
    # A batch mixing decode rows (1 new token) with prefill rows attends in two parts, so that
    # no decode row is padded to a prefill chunk's queries or keys: (token indices, part metadata).
    parts: list[tuple[torch.Tensor, "AttentionMetadata"]] = field(default_factory=list)
    _derived: dict = field(init=False, repr=False, default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return self.context_lens.numel()

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.numel()

    @property
    def query_lens(self) -> torch.Tensor:
        return self._once("query_lens", lambda: self.query_start_loc[1:] - self.query_start_loc[:-1])

    @property
    def token_seq_ids(self) -> torch.Tensor:
        """int64 [N]: the sequence each new token belongs to."""
        return self._once(
            "token_seq_ids",
            lambda: torch.repeat_interleave(
                torch.arange(self.num_seqs, device=self.context_lens.device), self.query_lens,
                output_size=self.num_tokens,
            ),
        )  # fmt: skip

    @property
    def token_offsets(self) -> torch.Tensor:
        """int64 [N]: each new token's index among its sequence's new tokens."""
        return self._once(
            "token_offsets",
            lambda: torch.arange(self.num_tokens, device=self.context_lens.device)
            - self.query_start_loc[self.token_seq_ids],
        )

    def _once(self, key: object, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``build()`` on first use, then the same tensor: derived once per step, shared by every layer."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str,
        split_parts: bool = True,
    ) -> "AttentionMetadata":
        """Index math for one step; raises ``ValueError`` on inconsistent inputs.  ``split_parts``: fill
        ``parts`` for a batch mixing decode and prefill rows (only the PyTorch path attends by parts)."""
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
        slots: list[int] = []
        for q, c, table in zip(query_lens, context_lens, block_tables):
            slots += (table[p // block_size] * block_size + p % block_size for p in range(c - q, c))
        query_start_loc = [0]
        for q in query_lens:
            query_start_loc.append(query_start_loc[-1] + q)
        # one copy to the device (pinned: a pageable one may wait for the step in flight), each view aligned
        padded_tables = [b for t in block_tables for b in t + [0] * (max_blocks - len(t))]
        qsl, ctx, slot, tables = to_device_aligned([query_start_loc, context_lens, slots, padded_tables], torch.int64,
                                                   torch.device(device))  # fmt: skip
        num_seqs = len(query_lens)
        meta = cls(
            query_start_loc=qsl,
            context_lens=ctx,
            block_tables=tables.view(num_seqs, max_blocks),
            slot_mapping=slot,
            max_query_len=max(query_lens),
            max_context_len=max(context_lens),
        )
        decodes = [i for i, q in enumerate(query_lens) if q == 1]
        if split_parts and 0 < len(decodes) < num_seqs:
            prefills = [i for i, q in enumerate(query_lens) if q > 1]
            for rows in (decodes, prefills):
                tokens = [t for i in rows for t in range(query_start_loc[i], query_start_loc[i + 1])]
                part = cls.build([query_lens[i] for i in rows], [context_lens[i] for i in rows],
                                 [block_tables[i] for i in rows], block_size, device)
                meta.parts.append((to_device(tokens, torch.int64, torch.device(device)), part))
        return meta

    def attention_mask(
        self, sliding_window: int | None = None, num_keys: int | None = None, group: int = 1
    ) -> torch.Tensor:
        """Bool ``[B, 1, max_query_len * group, num_keys]`` (``num_keys`` defaults to ``max_context_len``):
        True where a query may attend a key; row ``r`` is query ``r // group``.

        Causal with each sequence's offset, keys beyond its context masked out, and with
        ``sliding_window`` W only keys ``k > q - W`` kept (as HF).  Padded query rows copy
        the sequence's last real row so that no row is empty.
        """
        device = self.context_lens.device
        key = torch.arange(num_keys or self.max_context_len, device=device)[None, None, :]
        last = (self.context_lens - 1)[:, None, None]
        query = torch.arange(self.max_query_len * group, device=device) // group
        query_pos = torch.minimum((self.context_lens - self.query_lens)[:, None, None] + query[None, :, None], last)
        mask = key <= query_pos
        if sliding_window is not None:
            mask &= key > query_pos - sliding_window
        return mask[:, None]

    def num_blocks(self, block_size: int) -> int:
        """Blocks gathered per sequence: enough for the longest context."""
        return ceil_div(self.max_context_len, block_size)

    def additive_mask(
        self, block_size: int, group: int, sliding_window: int | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """``attention_mask`` over the gathered keys as 0 / -inf in ``dtype`` (what SDPA adds), once per step."""

        def build() -> torch.Tensor:
            allowed = self.attention_mask(sliding_window, self.num_blocks(block_size) * block_size, group)
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))

        return self._once(("mask", block_size, group, sliding_window, dtype), build)

    def gather_rows(self, cache: KVCache) -> torch.Tensor:
        """int64 ``[B * num_kv_heads * num_keys]``: the rows each sequence reads, head by head, key by key
        (``num_keys = num_blocks(block_size) * block_size``), in a layer's ``KVCache.plane_rows`` numbering."""

        def build() -> torch.Tensor:
            bs = cache.block_size
            blocks = self.block_tables[:, : self.num_blocks(bs)]
            key_slots = (blocks[:, :, None] * bs + torch.arange(bs, device=blocks.device)).view(self.num_seqs, 1, -1)
            heads = torch.arange(cache.num_kv_heads, device=blocks.device).view(1, -1, 1)
            return cache.plane_rows(key_slots, heads).flatten()

        return self._once(("gather", id(cache)), build)

    def cache_rows(self, cache: KVCache) -> torch.Tensor:
        """int64 ``[N * num_kv_heads]``: the rows of each new token's K/V heads (token-major, as
        ``k.reshape(-1, head_dim)``) in a layer's ``KVCache.plane_rows`` numbering."""

        def build() -> torch.Tensor:
            heads = torch.arange(cache.num_kv_heads, device=self.slot_mapping.device)
            return cache.plane_rows(self.slot_mapping[:, None], heads).flatten()

        return self._once(("rows", id(cache)), build)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: KVCache,
    layer: int,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Write the new ``k``/``v`` ``[N, Hkv, D]`` into layer ``layer`` of ``cache`` at ``meta.slot_mapping``,
    then attend.

    ``q`` is ``[N, H, D]``; each sequence attends causally to its whole context (cached plus
    new) gathered from its blocks.  Grouped query heads are folded into the query
    dimension (``[B, Hkv, Q * G, D]``), so K/V are never repeated.  A batch mixing decode and
    prefill rows attends in its two ``parts``.  Returns ``[N, H, D]``.
    """
    if meta.kv_source_rows is not None:
        k, v = k[meta.kv_source_rows], v[meta.kv_source_rows]
    head_dim = k.shape[-1]
    rows = meta.cache_rows(cache)
    for plane, new in zip(cache.layer(layer), (k, v)):
        plane.view(-1, head_dim).index_copy_(0, rows, new.reshape(-1, head_dim))
    if not meta.parts:
        return _attend(q, cache, layer, meta, scale, sliding_window)
    out = torch.empty_like(q)
    for tokens, part in meta.parts:
        out[tokens] = _attend(q[tokens], cache, layer, part, scale, sliding_window)
    return out


def _attend(
    q: torch.Tensor, cache: KVCache, layer: int, meta: AttentionMetadata, scale: float, sliding_window: int | None
) -> torch.Tensor:
    """``q`` ``[N, H, D]`` attends to the K/V of ``meta``'s sequences, gathered from layer ``layer``."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = cache.num_kv_heads
    group = num_heads // num_kv_heads
    bs = cache.block_size
    num_seqs, max_q = meta.num_seqs, meta.max_query_len
    num_keys = meta.num_blocks(bs) * bs
    rows = meta.gather_rows(cache)
    keys, values = (
        plane.view(-1, head_dim).index_select(0, rows).view(num_seqs, num_kv_heads, num_keys, head_dim)
        for plane in cache.layer(layer)
    )  # [B, Hkv, K, D]

    uniform = num_tokens == num_seqs * max_q  # every sequence has max_q new tokens: no query padding
    if uniform:
        queries = q.view(num_seqs, max_q, num_kv_heads, group, head_dim)
    else:
        queries = q.new_zeros(num_seqs, max_q, num_heads, head_dim)
        queries[meta.token_seq_ids, meta.token_offsets] = q
        queries = queries.view(num_seqs, max_q, num_kv_heads, group, head_dim)
    queries = queries.permute(0, 2, 1, 3, 4).reshape(num_seqs, num_kv_heads, max_q * group, head_dim)
    with sdpa_kernel(SDPA_BACKENDS):
        out = F.scaled_dot_product_attention(
            queries,
            keys,
            values,
            attn_mask=meta.additive_mask(bs, group, sliding_window, q.dtype),
            scale=scale,
        )  # [B, Hkv, Q * G, D]
    out = out.unflatten(2, (max_q, group)).permute(0, 2, 1, 3, 4)  # [B, Q, Hkv, G, D]
    if uniform:
        return out.reshape(num_tokens, num_heads, head_dim)
    return out[meta.token_seq_ids, meta.token_offsets].reshape(num_tokens, num_heads, head_dim)


def rotary_paged_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    rope_table: torch.Tensor,
    cache: KVCache,
    layer: int,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Rotary of ``q`` ``[N, H, D]`` and ``k`` ``[N, Hkv, D]`` at ``positions`` (``rope_table``: the model's
    ``RotaryEmbedding.table``), the rotated k and ``v`` written at ``meta.slot_mapping`` (row ``kv_source_rows[i]``
    at slot ``i``), then ``paged_attention``'s output, with the Triton kernels reading K/V where they are (no
    gather, no ``parts``).  A decode step (every sequence one query) runs it all in one fused kernel
    (``decode_attention.rotary_decode_attention``; q and k are left as they were); any other step runs
    ``rotary.apply_rotary_write_kv_`` (q rotated in place) then one ``prefill_attention`` over the whole (possibly
    mixed) batch."""
    if meta.max_query_len == 1:
        return decode_attention.rotary_decode_attention(
            q, k, v, positions, rope_table, cache.data, layer, meta.slot_mapping, meta.block_tables,
            meta.context_lens, scale, sliding_window, meta.kv_source_rows,
        )  # fmt: skip
    rotary.apply_rotary_write_kv_(
        q, k, v, positions, rope_table, cache.data, layer, meta.slot_mapping, meta.kv_source_rows
    )
    return kernels.prefill_attention(
        q, cache.data, layer, meta.block_tables, meta.query_start_loc, meta.context_lens, scale, sliding_window
    )
