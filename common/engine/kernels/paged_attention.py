"""Paged attention in Triton that reads K/V where the cache keeps them (no gather); PyTorch references of the
same contracts in ``paged_attention_reference``.

Layout: ``kv_data[num_blocks, num_kv_heads, block_size, num_layers, 2 (K, V), head_dim]`` (``KVCache``
"head-major"); slot ``s`` is block ``s // block_size``, offset ``s % block_size``.  The kernels take every
stride from the tensor and need only ``head_dim`` contiguous; block tables are int32/int64 ``[B, max_blocks]``.
A tile of ``BLOCK_N`` key positions looks up each position's block id, so any block size works.

- ``write_kv``: one program per new token stores its K and V rows of every KV head at its slot.
- ``decode_attention`` (flash-decoding): program (sequence, KV head, partition) scores the ``G`` query heads
  of that KV head (the rows of one ``tl.dot``: each K/V tile is loaded once for all of them) against its
  partition's keys with an online softmax, and writes the partition's unnormalised output, max and sum of
  exponentials; a reduce program per (sequence, query head) merges the partitions by log-sum-exp (with a
  single partition the partition kernel writes the output and the reduce is not launched).  The
  partition count follows from the block table's width (no host sync: CUDA-graph safe); partitions past a
  sequence's context exit at once.
- ``prefill_attention`` (flash-attention over the block table, varlen): program (query tile, KV head) holds
  ``BLOCK_M // G`` query tokens times the ``G`` heads of one KV head as ``BLOCK_M`` rows, and walks the key
  tiles from the window's start (or 0) to its last query's position, masked causally.  Query tiles are numbered
  as in vLLM's unified attention (sequence ``i``'s first is ``query_start_loc[i] // BLOCK_Q + i``, found by
  binary search), so the grid follows from shapes alone.

Softmax in base 2 with fp32 max, sum and accumulator; fp32 inputs multiply in IEEE precision (no TF32).
Constexpr (one compilation each): head dim, GQA group, cache block size, tile sizes, dot precision.  Tuning
knobs (module constants, overridable per call): ``partition_size``, ``block_n`` (decode), ``block_m``,
``block_n`` (prefill); warp counts.  K/V loads vectorise and pipeline when the cache's strides and
``layer * stride`` are multiples of 16 elements (``KVCache`` with head_dim >= 16).  Every sequence has
``context_lens >= 1`` and at least one query.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the references below still work
    triton = None

DECODE_PARTITION_SIZE = 512  # the largest split-K partition; smaller ones when the grid would be too small
DECODE_MIN_PROGRAMS = 256  # ~2 per SM of an H100/H200: partitions shrink (to DECODE_BLOCK_N) until the grid has these
DECODE_BLOCK_N = 64
DECODE_NUM_WARPS = 4
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
def _decode_partition_kernel(
    q_ptr, kv_ptr, tables_ptr, context_lens_ptr, out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    layer_offset, scale_log2, window, num_parts, num_heads,
    stride_qb, stride_qh, stride_ob, stride_oh, stride_block, stride_head, stride_tok, stride_kind, stride_table,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PARTITION_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    seq, kv_head, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    first_key = tl.maximum(context_len - window, 0)
    part_start = part * PARTITION_SIZE
    part_end = tl.minimum(part_start + PARTITION_SIZE, context_len)
    if (part_end <= first_key) | (part_end <= part_start):
        return
    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    heads = kv_head * GROUP + rows
    q_mask = (rows < GROUP)[:, None] & (dims < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :], mask=q_mask, other=0.0)
    k_base = kv_ptr + layer_offset + kv_head * stride_head
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    denom = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    # every tile holds at least one key in [first_key, part_end): m is finite after the first
    for tile in range(tl.maximum(part_start, first_key - first_key % BLOCK_N), part_end, BLOCK_N):
        pos = tile + tl.arange(0, BLOCK_N)
        valid = (pos >= first_key) & (pos < part_end)
        block = tl.load(tables_ptr + seq * stride_table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        row = block * stride_block + (pos % BLOCK_SIZE) * stride_tok
        k = tl.load(k_base + row[None, :] + dims[:, None], mask=valid[None, :] & (dims < HEAD_DIM)[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        denom = denom * alpha + tl.sum(p, 1)
        v_mask = valid[:, None] & (dims < HEAD_DIM)[None, :]
        v = tl.load(k_base + stride_kind + row[:, None] + dims[None, :], mask=v_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
    if num_parts == 1:  # the only partition: the output itself, as the reduce would write it (not launched)
        out = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :]
        tl.store(out, (acc / denom[:, None]).to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        stat = (seq * num_heads + heads).to(tl.int64) * num_parts + part
        tl.store(part_max_ptr + stat, m, mask=rows < GROUP)
        tl.store(part_sum_ptr + stat, denom, mask=rows < GROUP)
        tl.store(part_acc_ptr + stat[:, None] * HEAD_DIM_PAD + dims[None, :], acc, mask=(rows < GROUP)[:, None])


@_jit
def _decode_reduce_kernel(
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, context_lens_ptr, window, num_parts, num_heads,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PARTITION_SIZE: tl.constexpr,
):  # fmt: skip
    seq, head = tl.program_id(0), tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    first_key = tl.maximum(context_len - window, 0)
    first = first_key // PARTITION_SIZE
    dims = tl.arange(0, HEAD_DIM_PAD)
    stat = (seq * num_heads + head).to(tl.int64) * num_parts
    m = tl.load(part_max_ptr + stat + first)
    denom = tl.load(part_sum_ptr + stat + first)
    acc = tl.load(part_acc_ptr + (stat + first) * HEAD_DIM_PAD + dims)
    for part in range(first + 1, tl.cdiv(context_len, PARTITION_SIZE)):
        m_part = tl.load(part_max_ptr + stat + part)
        m_new = tl.maximum(m, m_part)
        alpha, beta = tl.exp2(m - m_new), tl.exp2(m_part - m_new)
        denom = denom * alpha + tl.load(part_sum_ptr + stat + part) * beta
        acc = acc * alpha + tl.load(part_acc_ptr + (stat + part) * HEAD_DIM_PAD + dims) * beta
        m = m_new
    out = out_ptr + seq * stride_ob + head * stride_oh + dims
    tl.store(out, (acc / denom).to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


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


def decode_attention(
    q: torch.Tensor,
    kv_data: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    partition_size: int | None = None,
    block_n: int = DECODE_BLOCK_N,
) -> torch.Tensor:
    """``q`` ``[B, H, D]``: sequence ``b``'s query at position ``context_lens[b] - 1`` attends to its
    ``context_lens[b]`` cached keys (the last ``sliding_window`` of them if given).  Returns ``[B, H, D]``.

    ``partition_size`` (a multiple of ``block_n``) keys per split-K program (default: ``decode_partition_size``);
    ``block_n`` keys per tile.
    """
    block_size, layer_offset, strides, group = _cache_args(kv_data, layer, q)
    num_seqs, num_heads, head_dim = q.shape
    if partition_size is None:
        partition_size = decode_partition_size(num_seqs, kv_data.shape[1], block_tables.shape[1] * block_size)
    if partition_size % block_n or not _pow2_16(block_n):
        raise ValueError(f"decode_attention: block_n {block_n} (a power of 2 >= 16) must divide {partition_size}")
    num_parts = triton.cdiv(block_tables.shape[1] * block_size, partition_size)
    head_dim_pad = max(triton.next_power_of_2(head_dim), 16)
    part_acc = q.new_empty(num_seqs, num_heads, num_parts, head_dim_pad, dtype=torch.float32)
    part_max, part_sum = q.new_empty(2, num_seqs, num_heads, num_parts, dtype=torch.float32)
    out = q.new_empty(q.shape)
    window = _window(sliding_window)
    _decode_partition_kernel[(num_seqs, kv_data.shape[1], num_parts)](
        q, kv_data, block_tables, context_lens, out, part_acc, part_max, part_sum,
        layer_offset, scale * LOG2E, window, num_parts, num_heads,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *strides, block_tables.stride(0),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), 16),
        BLOCK_SIZE=block_size, BLOCK_N=block_n, PARTITION_SIZE=partition_size,
        DOT_PRECISION=_dot_precision(q), num_warps=DECODE_NUM_WARPS,
    )  # fmt: skip
    if num_parts == 1:  # the partition kernel wrote ``out``
        return out
    _decode_reduce_kernel[(num_seqs, num_heads)](
        out, part_acc, part_max, part_sum, context_lens, window, num_parts, num_heads,
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, PARTITION_SIZE=partition_size,
    )  # fmt: skip
    return out


def decode_partition_size(num_seqs: int, num_kv_heads: int, max_keys: int) -> int:
    """The largest partition, from ``DECODE_PARTITION_SIZE`` halving down to ``DECODE_BLOCK_N``, that still gives
    the split-K grid (sequences x KV heads x partitions of ``max_keys``) ``DECODE_MIN_PROGRAMS`` programs: a batch of
    one over a short context otherwise runs a handful of programs on a GPU of 132 SMs.  A function of the shapes
    alone, so a CUDA graph bucket always gets the same one."""
    size = DECODE_PARTITION_SIZE
    while size > DECODE_BLOCK_N and num_seqs * num_kv_heads * -(-max_keys // size) < DECODE_MIN_PROGRAMS:
        size //= 2
    return size


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
