"""Decode attention in Triton (flash-decoding: one query per sequence, split-K over the paged cache), alone or
fused with rotary and the new token's K/V write; the cache layout and conventions of ``paged_attention``.

- ``decode_attention``: program (sequence, KV head, partition) scores the ``G`` query heads of that KV head
  (the rows of one ``tl.dot``: each K/V tile is loaded once for all of them) against its partition's keys with
  an online softmax, and writes the partition's unnormalised output, max and sum of exponentials; a reduce
  program per (sequence, query head) merges the partitions by log-sum-exp (with a single partition the
  partition kernel writes the output and the reduce is not launched).  The partition count follows from the
  block table's width (no host sync: CUDA-graph safe); partitions past a sequence's context exit at once.
- ``rotary_decode_attention``: a decode step's ``rotary.apply_rotary_write_kv_`` then ``decode_attention`` in
  the same launches (one, plus the reduce).  Each program rotates its ``G`` query heads itself (in registers: q
  is left as it was); the program whose partition holds the new token (position ``context_len - 1``) rotates
  that token's K, stores it and V at its slot and scores them from registers, never loading that slot (under
  CUDA-graph padding another program may be storing the same values there).  Rounded as the two unfused kernels
  round (q and K rotated to the dtype, then attention): output and cache are theirs bit for bit, in Triton's
  interpreter and compiled -- the partition kernel, fused or not, compiles without FMA contraction
  (``rotary.NO_FP_FUSION``; with it, on the H200, the two differed by up to 0.008 in bf16).

Both kernels are launched with programmatic dependent launch where ``pdl`` enables it (on a CUDA graph's chain of
decode kernels they start during the tail of the one before) and wait for it before reading anything.

Tuning knobs (module constants, overridable per call): ``partition_size`` (by default ``decode_partition_size``
of the shapes), ``block_n``; warp count.
"""

from __future__ import annotations

import torch

from common.engine.kernels import paged_attention as pa
from common.engine.kernels import paged_attention_reference, pdl, rotary
from common.engine.kernels.paged_attention import _jit, triton

if triton is not None:
    import triton.language as tl

DECODE_PARTITION_SIZE = 512  # the largest split-K partition; smaller ones when the grid would be too small
DECODE_MIN_PROGRAMS = 256  # ~2 per SM of an H100/H200: partitions shrink (to DECODE_BLOCK_N) until the grid has these
DECODE_BLOCK_N = 64
DECODE_NUM_WARPS = 4


@_jit
def _decode_partition_kernel(
    q_ptr, kv_ptr, tables_ptr, context_lens_ptr, out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    layer_offset, scale_log2, window, num_parts, num_heads,
    stride_qb, stride_qh, stride_ob, stride_oh, stride_block, stride_head, stride_tok, stride_kind, stride_table,
    k_ptr, v_ptr, pos_ptr, rope_ptr, slot_ptr, source_ptr, stride_kb, stride_kh, stride_vb, stride_vh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PARTITION_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, FUSED: tl.constexpr, HAS_SOURCE: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    """``FUSED``: rotary of q, and the new token's K/V (``k_ptr`` ... ``stride_vh``, unused otherwise)."""
    pdl.wait(USE_PDL)
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
    q_rows = q_ptr + seq * stride_qb + heads[:, None] * stride_qh
    q = tl.load(q_rows + dims[None, :], mask=q_mask, other=0.0)
    k_base = kv_ptr + layer_offset + kv_head * stride_head
    new_key = context_len - 1
    if FUSED:
        partner = (dims + HEAD_DIM // 2) % HEAD_DIM  # rotate-half: lane d pairs with lane d +- D/2
        cos, sin = rotary._cos_sin_lanes(pos_ptr, rope_ptr, seq, dims, HEAD_DIM)
        q = rotary._rope(q, tl.load(q_rows + partner[None, :], mask=q_mask, other=0.0), cos[None, :], sin[None, :])
        if HAS_SOURCE:  # the row of k/v this slot takes (CUDA-graph padding repeats a real row)
            source = tl.load(source_ptr + seq).to(tl.int64)
            cos, sin = rotary._cos_sin_lanes(pos_ptr, rope_ptr, source, dims, HEAD_DIM)
        else:
            source = seq.to(tl.int64)
        new_mask = (dims < HEAD_DIM) & (new_key < part_end)  # only the partition of the new key loads it
        k_row = k_ptr + source * stride_kb + kv_head * stride_kh
        k_new = rotary._rope(tl.load(k_row + dims, mask=new_mask, other=0.0),
                             tl.load(k_row + partner, mask=new_mask, other=0.0), cos, sin)  # fmt: skip
        v_new = tl.load(v_ptr + source * stride_vb + kv_head * stride_vh + dims, mask=new_mask, other=0.0)
        slot = tl.load(slot_ptr + seq).to(tl.int64)
        dst = k_base + (slot // BLOCK_SIZE) * stride_block + (slot % BLOCK_SIZE) * stride_tok + dims
        tl.store(dst, k_new, mask=new_mask)
        tl.store(dst + stride_kind, v_new, mask=new_mask)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    denom = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    # every tile holds at least one key in [first_key, part_end): m is finite after the first
    for tile in range(tl.maximum(part_start, first_key - first_key % BLOCK_N), part_end, BLOCK_N):
        pos = tile + tl.arange(0, BLOCK_N)
        valid = (pos >= first_key) & (pos < part_end)
        if FUSED:
            cached = valid & (pos != new_key)  # the new key comes from registers
        else:
            cached = valid
        block = tl.load(tables_ptr + seq * stride_table + pos // BLOCK_SIZE, mask=cached, other=0).to(tl.int64)
        row = block * stride_block + (pos % BLOCK_SIZE) * stride_tok
        k = tl.load(k_base + row[None, :] + dims[:, None], mask=cached[None, :] & (dims < HEAD_DIM)[:, None], other=0.0)
        if FUSED:
            k = tl.where((pos == new_key)[None, :], k_new[:, None], k)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m - m_new)
        denom = denom * alpha + tl.sum(p, 1)
        v_mask = cached[:, None] & (dims < HEAD_DIM)[None, :]
        v = tl.load(k_base + stride_kind + row[:, None] + dims[None, :], mask=v_mask, other=0.0)
        if FUSED:
            v = tl.where((pos == new_key)[:, None], v_new[None, :], v)
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
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PARTITION_SIZE: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl.wait(USE_PDL)
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
    unused = dict(k_ptr=q, v_ptr=q, pos_ptr=context_lens, rope_ptr=q, slot_ptr=context_lens, source_ptr=context_lens,
                  stride_kb=0, stride_kh=0, stride_vb=0, stride_vh=0, FUSED=False, HAS_SOURCE=False)  # fmt: skip
    return _decode(
        q, kv_data, layer, block_tables, context_lens, scale, sliding_window, partition_size, block_n, unused
    )


def rotary_decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin_table: torch.Tensor,
    kv_data: torch.Tensor, layer: int, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, sliding_window: int | None = None,
    source_rows: torch.Tensor | None = None, *, partition_size: int | None = None, block_n: int = DECODE_BLOCK_N,
) -> torch.Tensor:
    """``rotary_decode_attention_reference`` in one kernel (plus the split-K reduce): ``q`` ``[B, H, D]`` and
    ``k``/``v`` ``[B, Hkv, D]`` one row per sequence, as ``rotary.apply_rotary_write_kv_`` takes them (q and k
    unchanged here), ``slot_mapping[b]`` the slot of position ``context_lens[b] - 1`` in ``block_tables[b]``; the
    tuning keywords as ``decode_attention``'s.  Returns ``[B, H, D]``."""
    rotary._check_write("rotary_decode_attention", q, k, v, positions, cos_sin_table, kv_data, layer, slot_mapping,
                        source_rows)  # fmt: skip
    fused = dict(k_ptr=k, v_ptr=v, pos_ptr=positions, rope_ptr=cos_sin_table, slot_ptr=slot_mapping,
                 source_ptr=slot_mapping if source_rows is None else source_rows, stride_kb=k.stride(0),
                 stride_kh=k.stride(1), stride_vb=v.stride(0), stride_vh=v.stride(1), FUSED=True,
                 HAS_SOURCE=source_rows is not None)  # fmt: skip
    return _decode(
        q, kv_data, layer, block_tables, context_lens, scale, sliding_window, partition_size, block_n, fused
    )


def rotary_decode_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin_table: torch.Tensor,
    kv_data: torch.Tensor, layer: int, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, sliding_window: int | None = None,
    source_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``rotary.apply_rotary_write_kv_reference`` (on a copy of ``q``: ``q`` and ``k`` are left as they are), then
    ``paged_attention_reference.decode_attention_reference`` of the rotated queries."""
    q = q.clone()
    rotary.apply_rotary_write_kv_reference(q, k, v, positions, cos_sin_table, kv_data, layer, slot_mapping, source_rows)
    return paged_attention_reference.decode_attention_reference(
        q, kv_data, layer, block_tables, context_lens, scale, sliding_window
    )


def decode_partition_size(num_seqs: int, num_kv_heads: int, max_keys: int) -> int:
    """The largest partition, from ``DECODE_PARTITION_SIZE`` halving down to ``DECODE_BLOCK_N``, that still gives
    the split-K grid (sequences x KV heads x partitions of ``max_keys``) ``DECODE_MIN_PROGRAMS`` programs: a batch of
    one over a short context otherwise runs a handful of programs on a GPU of 132 SMs.  A function of the shapes
    alone, so a CUDA graph bucket always gets the same one."""
    size = DECODE_PARTITION_SIZE
    while size > DECODE_BLOCK_N and num_seqs * num_kv_heads * -(-max_keys // size) < DECODE_MIN_PROGRAMS:
        size //= 2
    return size


def _decode(
    q: torch.Tensor, kv_data: torch.Tensor, layer: int, block_tables: torch.Tensor, context_lens: torch.Tensor,
    scale: float, sliding_window: int | None, partition_size: int | None, block_n: int, variant: dict,
) -> torch.Tensor:
    """Launch the partition kernel (its ``variant`` arguments: ``FUSED`` and what it reads) and, with more than
    one partition, the reduce."""
    block_size, layer_offset, strides, group = pa._cache_args(kv_data, layer, q)
    num_seqs, num_heads, head_dim = q.shape
    if partition_size is None:
        partition_size = decode_partition_size(num_seqs, kv_data.shape[1], block_tables.shape[1] * block_size)
    if partition_size % block_n or not pa._pow2_16(block_n):
        raise ValueError(f"decode_attention: block_n {block_n} (a power of 2 >= 16) must divide {partition_size}")
    num_parts = triton.cdiv(block_tables.shape[1] * block_size, partition_size)
    head_dim_pad = max(triton.next_power_of_2(head_dim), 16)
    part_acc = q.new_empty(num_seqs, num_heads, num_parts, head_dim_pad, dtype=torch.float32)
    part_max, part_sum = q.new_empty(2, num_seqs, num_heads, num_parts, dtype=torch.float32)
    out = q.new_empty(q.shape)
    window = pa._window(sliding_window)
    _decode_partition_kernel[(num_seqs, kv_data.shape[1], num_parts)](
        q, kv_data, block_tables, context_lens, out, part_acc, part_max, part_sum,
        layer_offset, scale * pa.LOG2E, window, num_parts, num_heads,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *strides, block_tables.stride(0), **variant,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, GROUP=group, GROUP_PAD=max(triton.next_power_of_2(group), 16),
        BLOCK_SIZE=block_size, BLOCK_N=block_n, PARTITION_SIZE=partition_size,
        DOT_PRECISION=pa._dot_precision(q), num_warps=DECODE_NUM_WARPS, **pdl.options(q), **rotary.NO_FP_FUSION,
    )  # fmt: skip
    if num_parts == 1:  # the partition kernel wrote ``out``
        return out
    _decode_reduce_kernel[(num_seqs, num_heads)](
        out, part_acc, part_max, part_sum, context_lens, window, num_parts, num_heads,
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, PARTITION_SIZE=partition_size, **pdl.options(q),
    )  # fmt: skip
    return out
