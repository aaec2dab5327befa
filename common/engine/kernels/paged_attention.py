"""Paged attention in Triton that reads K/V where the cache keeps them (no gather); PyTorch references of the
same contracts in ``paged_attention_reference``.

Layout: ``kv_data[num_blocks, num_kv_heads, block_size, num_layers, 2 (K, V), head_dim]`` (``KVCache``
"head-major"); slot ``s`` is block ``s // block_size``, offset ``s % block_size``.  The kernels take every
stride from the tensor and need only ``head_dim`` contiguous; block tables are int32/int64 ``[B, max_blocks]``.
A tile of ``BLOCK_N`` key positions looks up each position's block id, so any block size works.

- ``write_kv``: one program per new token stores its K and V rows of every KV head at its slot.
- Decode (one query per sequence, split-K): module ``decode_attention``, which also fuses rotary and this K/V
  write into its kernel for decode steps.
- ``prefill_attention`` (flash-attention over the block table, varlen): program (query tile, KV head) holds
  ``BLOCK_M // G`` query tokens times the ``G`` heads of one KV head as ``BLOCK_M`` rows, and walks the key
  tiles from the window's start (or 0) to its last query's position, masked causally.  Query tiles are numbered
  as in vLLM's unified attention (sequence ``i``'s first is ``query_start_loc[i] // BLOCK_Q + i``, found by
  binary search), so the grid follows from shapes alone.

Softmax in base 2 with fp32 max, sum and accumulator; fp32 inputs multiply in IEEE precision (no TF32).
Constexpr (one compilation each): head dim, GQA group, cache block size, tile sizes, dot precision.  Tuning
knobs (module constants, overridable per call): ``block_m``, ``block_n``; warp counts.  K/V loads vectorise
and pipeline when the cache's strides and ``layer * stride`` are multiples of 16 elements (``KVCache`` with
head_dim >= 16).  Every sequence has
``context_lens >= 1`` and at least one query.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the references below still work
    triton = None

PREFILL_BLOCK_M = 128
PREFILL_BLOCK_N = 64
PREFILL_NUM_WARPS = 8
LOG2E = 1.4426950408889634
NO_WINDOW = 2**30


def available() -> bool:
    """Whether Triton is importable (the kernels then run on CUDA tensors, or anywhere under TRITON_INTERPRET=1)."""
    return triton is not None


# Arguments that change from call to call (batch size, block-table width, partition count): Triton would
# otherwise compile a kernel variant per value class (== 1, divisible by 16, other) the first time each class
# appears, a stall of a second or more in the middle of serving.  (``layer_offset`` and the cache strides keep
# their divisibility hint: it vectorises the K/V loads, and they are multiples of 16 for every layer.)
VARYING = ("num_seqs", "num_parts", "stride_table")


def _jit(fn):
    if triton is None:
        return fn
    names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
    return triton.jit(fn, do_not_specialize=[name for name in VARYING if name in names])


@_jit
def _write_kv_kernel(
    k_ptr, v_ptr, kv_ptr, slot_ptr, source_ptr, layer_offset, block_size, num_kv_heads,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_block, stride_head, stride_tok, stride_kind,
    HEAD_DIM: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, HAS_SOURCE: tl.constexpr,
):  # fmt: skip
    slot = tl.load(slot_ptr + tl.program_id(0)).to(tl.int64)
    if HAS_SOURCE:  # the row of k/v this slot takes (CUDA-graph padding repeats a real row)
        token = tl.load(source_ptr + tl.program_id(0)).to(tl.int64)
    else:
        token = tl.program_id(0)
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HEAD_DIM_PAD)[None, :]
    mask = (heads < num_kv_heads) & (dims < HEAD_DIM)
    dst = kv_ptr + layer_offset + (slot // block_size) * stride_block + (slot % block_size) * stride_tok
    dst += heads * stride_head + dims
    tl.store(dst, tl.load(k_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask), mask=mask)
    tl.store(dst + stride_kind, tl.load(v_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask), mask=mask)


@_jit
def _prefill_kernel(
    q_ptr, kv_ptr, out_ptr, tables_ptr, query_start_ptr, context_lens_ptr,
    layer_offset, scale_log2, window, num_seqs,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_block, stride_head, stride_tok, stride_kind, stride_table,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    q_tile, kv_head = tl.program_id(0), tl.program_id(1)
    # the sequence of this tile: the last i whose first tile query_start_loc[i] // BLOCK_Q + i <= q_tile
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_ptr + mid) // BLOCK_Q + mid <= q_tile:
            lo = mid + 1
        else:
            hi = mid
    seq = lo - 1
    query_start = tl.load(query_start_ptr + seq)
    query_len = tl.load(query_start_ptr + seq + 1) - query_start
    tile_start = (q_tile - query_start // BLOCK_Q - seq) * BLOCK_Q
    if tile_start >= query_len:
        return
    context_len = tl.load(context_lens_ptr + seq)
    first_pos = context_len - query_len + tile_start  # position of the tile's first query
    key_end = tl.minimum(first_pos + BLOCK_Q, context_len)  # past the tile's last query
    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM_PAD)
    token = tile_start + rows // GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (token < query_len)
    query_pos = tl.minimum(context_len - query_len + token, key_end - 1)  # padding rows: a real position
    heads = kv_head * GROUP + rows % GROUP
    q_mask = row_valid[:, None] & (dims < HEAD_DIM)[None, :]
    q_rows = (query_start + token).to(tl.int64)[:, None] * stride_qt + heads[:, None] * stride_qh
    q = tl.load(q_ptr + q_rows + dims[None, :], mask=q_mask, other=0.0)
    k_base = kv_ptr + layer_offset + kv_head * stride_head
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    key_start = tl.maximum(first_pos - window + 1, 0)
    for tile in range(key_start - key_start % BLOCK_N, key_end, BLOCK_N):
        pos = tile + tl.arange(0, BLOCK_N)
        in_range = pos < key_end
        block = tl.load(tables_ptr + seq * stride_table + pos // BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)
        row = block * stride_block + (pos % BLOCK_SIZE) * stride_tok
        k_mask = in_range[None, :] & (dims < HEAD_DIM)[:, None]
        k = tl.load(k_base + row[None, :] + dims[:, None], mask=k_mask, other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
        allowed = (pos[None, :] <= query_pos[:, None]) & (pos[None, :] > query_pos[:, None] - window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet (sliding window)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        denom = denom * alpha + tl.sum(p, 1)
        v_mask = in_range[:, None] & (dims < HEAD_DIM)[None, :]
        v = tl.load(k_base + stride_kind + row[:, None] + dims[None, :], mask=v_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
    o_rows = (query_start + token).to(tl.int64)[:, None] * stride_ot + heads[:, None] * stride_oh
    tl.store(out_ptr + o_rows + dims[None, :], (acc / denom[:, None]).to(out_ptr.dtype.element_ty), mask=q_mask)


def write_kv(kv_data: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             source_rows: torch.Tensor | None = None) -> None:
    """Store ``k``/``v`` ``[N, Hkv, D]`` into layer ``layer`` of ``kv_data`` at the slots ``slot_mapping`` (int [N]);
    with ``source_rows`` (int [M]) slot ``i`` of ``slot_mapping[:M]`` takes row ``source_rows[i]`` instead of row ``i``
    (what CUDA-graph padding asks, without gathering ``k`` and ``v`` first)."""
    block_size, layer_offset, strides, group = _cache_args(kv_data, layer, k)
    num_rows, num_kv_heads, head_dim = k.shape
    num_tokens = num_rows if source_rows is None else source_rows.shape[0]
    if (group != 1 or v.shape != k.shape or slot_mapping.shape != (num_tokens,) or v.stride(-1) != 1
            or (source_rows is not None and source_rows.dim() != 1)):
        raise ValueError(f"write_kv: k {tuple(k.shape)}, v {tuple(v.shape)}, slot_mapping {tuple(slot_mapping.shape)}"
                         + ("" if source_rows is None else f", source_rows {tuple(source_rows.shape)}"))
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, kv_data, slot_mapping, slot_mapping if source_rows is None else source_rows, layer_offset, block_size,
        num_kv_heads, k.stride(0), k.stride(1), v.stride(0), v.stride(1), *strides,
        HEAD_DIM=head_dim, HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim), HAS_SOURCE=source_rows is not None,
    )  # fmt: skip


def prefill_attention(
    q: torch.Tensor,
    kv_data: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    block_m: int = PREFILL_BLOCK_M,
    block_n: int = PREFILL_BLOCK_N,
) -> torch.Tensor:
    """``q`` ``[N, H, D]`` packed by ``query_start_loc`` (int [B+1]): sequence ``i``'s queries are the last
    ``query_start_loc[i+1] - query_start_loc[i]`` of its ``context_lens[i]`` positions, all already in the
    cache; each attends causally to the keys up to its position (the last ``sliding_window`` if given).
    Returns ``[N, H, D]``.  ``block_m`` rows (query tokens x GQA group) and ``block_n`` keys per tile.
    """
    block_size, layer_offset, strides, group = _cache_args(kv_data, layer, q)
    num_tokens, num_seqs, head_dim = q.shape[0], context_lens.shape[0], q.shape[2]
    if group > block_m or not (_pow2_16(block_m) and _pow2_16(block_n)):
        raise ValueError(f"prefill_attention: block_m {block_m}, block_n {block_n}: powers of 2 >= 16 and >= {group}")
    out = q.new_empty(q.shape)
    block_q = block_m // group
    _prefill_kernel[(num_tokens // block_q + num_seqs, kv_data.shape[1])](
        q, kv_data, out, block_tables, query_start_loc, context_lens,
        layer_offset, scale * LOG2E, _window(sliding_window), num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *strides, block_tables.stride(0),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=max(triton.next_power_of_2(head_dim), 16), GROUP=group,
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(q), num_warps=PREFILL_NUM_WARPS,
    )  # fmt: skip
    return out


def _cache_args(kv_data: torch.Tensor, layer: int, x: torch.Tensor) -> tuple[int, int, tuple[int, ...], int]:
    """(block size, offset of layer ``layer``, strides of block / head / token / K-to-V, heads of ``x`` per KV
    head) of ``kv_data``; raises on what the kernels cannot read."""
    if triton is None:
        raise RuntimeError("paged attention kernels need triton (use paged_attention_reference without it)")
    if kv_data.dim() != 6 or kv_data.shape[4] != 2 or kv_data.stride(5) != 1 or x.stride(-1) != 1:
        raise ValueError(
            f"paged attention: kv_data [blocks, kv_heads, block_size, layers, 2, head_dim] with contiguous head_dim "
            f"rows, got {tuple(kv_data.shape)} strides {kv_data.stride()}; input strides {x.stride()}"
        )
    _, num_kv_heads, block_size, num_layers, _, head_dim = kv_data.shape
    if not 0 <= layer < num_layers or x.shape[-1] != head_dim or x.dtype != kv_data.dtype or x.shape[1] % num_kv_heads:
        raise ValueError(
            f"paged attention: layer {layer}, {x.shape[1]} heads of {x.shape[-1]} {x.dtype} for kv_data "
            f"{tuple(kv_data.shape)} {kv_data.dtype}"
        )
    s_block, s_head, s_tok, s_layer, s_kind, _ = kv_data.stride()
    return block_size, layer * s_layer, (s_block, s_head, s_tok, s_kind), x.shape[1] // num_kv_heads


def _window(sliding_window: int | None) -> int:
    """Keys a query sees, itself included: no window is one wider than any context (int32)."""
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"paged attention: sliding_window must be >= 1, got {sliding_window}")
    return sliding_window or NO_WINDOW


def _pow2_16(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def _dot_precision(q: torch.Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"  # the latter is ignored for 16-bit inputs
