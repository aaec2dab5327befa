"""Rotary position embedding applied in place to Q and K, rotate-half (HF) convention.

``cos_sin_table`` is ``RotaryEmbedding.table`` of ``common.engine.model``: ``[max_positions, 2, head_dim]``
in the model dtype, row ``p`` holding ``cos`` and the signed ``sin`` (first half negated) of position
``p``, so ``rope(x) = x * cos + roll(x, D/2) * sin``.  The kernel rounds where the reference rounds
(each product, then the sum, in the tensor dtype), so results match the reference exactly, fp32 included.
Every kernel that rotates (these and the fused decode kernel) is compiled without FMA contraction
(``NO_FP_FUSION``): with it, on the H200, Triton fused products into the sum across those roundings, the
16-bit K written to the cache was an ulp off the reference, and the fused decode kernel and the unfused
kernels wrote different K and returned outputs up to 0.008 apart in bf16; without it all three agree bit
for bit (session 11).

One program rotates every head of Q and K of one token: ``[heads, D/2]`` tiles of both halves of the
rows, the token's cos/sin row loaded once.  Q and K may be strided views (e.g. of a fused qkv output):
rows and heads take any stride, the head dimension must be contiguous.

``apply_rotary_write_kv_`` fuses the rotation with ``paged_attention.write_kv`` (one launch instead of two
per layer): program ``i`` rotates Q row ``i`` in place and stores row ``source_rows[i]`` of K (rotated at
that row's position) and V at slot ``slot_mapping[i]``.  K itself is left as it was: with CUDA-graph padding
several programs read one K row, so none may rewrite it; attention reads K from the cache.  Decode steps fuse
attention too (``decode_attention.rotary_decode_attention``, with this module's ``_rope`` and ``_cos_sin_lanes``).
"""

from __future__ import annotations

import torch

from common.engine.kernels import paged_attention, paged_attention_reference

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the reference still works
    triton = None

# Launch option of every kernel that calls ``_rope``: no FMA contraction, so the roundings ``_rope`` spells out hold.
NO_FP_FUSION = {"enable_fp_fusion": False}


def available() -> bool:
    """Whether the Triton kernel can run (``triton`` importable)."""
    return triton is not None


def apply_rotary_reference(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_table: torch.Tensor
) -> None:
    """Rotate ``q`` ``[N, H, D]`` and ``k`` ``[N, Hkv, D]`` in place at ``positions`` ``[N]``."""
    cos_sin = cos_sin_table[positions]
    cos, sin = cos_sin[:, None, 0], cos_sin[:, None, 1]
    for x in (q, k):
        x.copy_(x * cos + torch.roll(x, x.shape[-1] // 2, -1) * sin)


def apply_rotary_write_kv_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin_table: torch.Tensor,
    kv_data: torch.Tensor, layer: int, slot_mapping: torch.Tensor, source_rows: torch.Tensor | None = None,
) -> None:
    """Rotate ``q`` in place, then ``paged_attention_reference.write_kv_reference`` of the rotated ``k`` (``k`` unchanged)
    and ``v`` into layer ``layer`` of ``kv_data`` at ``slot_mapping`` (row ``source_rows[i]`` at slot ``i``)."""
    k = k.clone()
    apply_rotary_reference(q, k, positions, cos_sin_table)
    paged_attention_reference.write_kv_reference(kv_data, layer, k, v, slot_mapping, source_rows)


def apply_rotary_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_table: torch.Tensor) -> None:
    """Triton ``apply_rotary_reference`` (same contract; ``cos_sin_table`` contiguous, same dtype as q and k)."""
    n, heads, dim = q.shape
    kv_heads = k.shape[1]
    _check("apply_rotary_", q, k, positions, cos_sin_table)
    if n == 0:
        return
    _rotary_kernel[(n,)](
        q, k, positions, cos_sin_table, q.stride(0), q.stride(1), k.stride(0), k.stride(1), heads, kv_heads,
        HALF=dim // 2, BLOCK_HALF=triton.next_power_of_2(dim // 2),
        BLOCK_HQ=triton.next_power_of_2(heads), BLOCK_HK=triton.next_power_of_2(kv_heads), **NO_FP_FUSION,
    )  # fmt: skip


def apply_rotary_write_kv_(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin_table: torch.Tensor,
    kv_data: torch.Tensor, layer: int, slot_mapping: torch.Tensor, source_rows: torch.Tensor | None = None,
) -> None:
    """Triton ``apply_rotary_write_kv_reference`` (same contract; the layouts ``apply_rotary_`` and
    ``paged_attention.write_kv`` take, ``slot_mapping`` and ``source_rows`` one entry per row of ``q``)."""
    n, heads, dim = q.shape
    kv_heads = k.shape[1]
    block_size, layer_offset, strides = _check_write("apply_rotary_write_kv_", q, k, v, positions, cos_sin_table,
                                                     kv_data, layer, slot_mapping, source_rows)  # fmt: skip
    if n == 0:
        return
    _rotary_write_kv_kernel[(n,)](
        q, k, v, kv_data, positions, cos_sin_table, slot_mapping, slot_mapping if source_rows is None else source_rows,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), heads, kv_heads,
        layer_offset, block_size, *strides,
        HALF=dim // 2, BLOCK_HALF=triton.next_power_of_2(dim // 2), BLOCK_HQ=triton.next_power_of_2(heads),
        BLOCK_HK=triton.next_power_of_2(kv_heads), HAS_SOURCE=source_rows is not None, **NO_FP_FUSION,
    )  # fmt: skip


def _check(name: str, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_table: torch.Tensor) -> None:
    """Raise ``ValueError`` unless the kernels can rotate ``q`` and ``k`` at ``positions`` with the table."""
    n, _, dim = q.shape
    if k.shape != (n, k.shape[1], dim) or positions.shape != (n,) or cos_sin_table.shape[1:] != (2, dim):
        raise ValueError(
            f"{name}: q {tuple(q.shape)}, k {tuple(k.shape)}, positions {tuple(positions.shape)}, "
            f"table {tuple(cos_sin_table.shape)}"
        )
    if q.stride(2) != 1 or k.stride(2) != 1 or not cos_sin_table.is_contiguous() or dim % 2:
        raise ValueError(f"{name}: q and k need a contiguous even head dimension, the table contiguous")
    if not q.dtype == k.dtype == cos_sin_table.dtype:
        raise ValueError(f"{name}: dtypes q {q.dtype}, k {k.dtype}, table {cos_sin_table.dtype} differ")


def _check_write(
    name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin_table: torch.Tensor,
    kv_data: torch.Tensor, layer: int, slot_mapping: torch.Tensor, source_rows: torch.Tensor | None,
) -> tuple[int, int, tuple[int, ...]]:
    """``_check``, then raise ``ValueError`` unless the kernels can store the rotated ``k`` and ``v`` (rows as
    ``q``'s) at ``slot_mapping`` in layer ``layer`` of ``kv_data``; returns its block size, layer offset and
    strides (``paged_attention._cache_args``)."""
    n = q.shape[0]
    _check(name, q, k, positions, cos_sin_table)
    block_size, layer_offset, strides, group = paged_attention._cache_args(kv_data, layer, k)
    if group != 1 or v.shape != k.shape or v.stride(2) != 1 or slot_mapping.shape != (n,) or (
            source_rows is not None and source_rows.shape != (n,)):  # fmt: skip
        source = "" if source_rows is None else f", source_rows {tuple(source_rows.shape)}"
        raise ValueError(
            f"{name}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
            f"slot_mapping {tuple(slot_mapping.shape)}{source} for kv_data {tuple(kv_data.shape)}"
        )
    return block_size, layer_offset, strides


if triton is not None:

    @triton.jit
    def _rope(x, partner, cos, sin):
        """``x * cos + partner * sin`` (fp32 ``cos``/``sin``) in the dtype of ``x``, rounded where the reference
        rounds: each product (exact in fp32 for 16-bit inputs), then the sum."""
        dtype = x.dtype
        product = (x.to(tl.float32) * cos).to(dtype).to(tl.float32)
        return (product + (partner.to(tl.float32) * sin).to(dtype).to(tl.float32)).to(dtype)

    @triton.jit
    def _rotated(x1, x2, cos1, cos2, sin1, sin2):
        """The rotated halves ``(x1*cos1 + x2*sin1, x2*cos2 + x1*sin2)`` of a row (``_rope`` of each)."""
        return _rope(x1, x2, cos1, sin1), _rope(x2, x1, cos2, sin2)

    @triton.jit
    def _cos_sin_lanes(pos_ptr, table_ptr, token, dims, HEAD_DIM: tl.constexpr):
        """fp32 ``cos, sin`` of the position of ``token`` at the lanes ``dims`` of a whole row (0 past
        ``HEAD_DIM``): a row's lane ``d`` rotates to ``_rope(x[d], x[(d + D/2) % D], cos[d], sin[d])``."""
        row = table_ptr + tl.load(pos_ptr + token).to(tl.int64) * (2 * HEAD_DIM)  # [2, D]: cos, then signed sin
        mask = dims < HEAD_DIM
        cos = tl.load(row + dims, mask=mask, other=0.0).to(tl.float32)
        return cos, tl.load(row + HEAD_DIM + dims, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _rotate(x_ptr, row_stride, head_stride, token, heads, cos1, cos2, sin1, sin2,
                HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
        """Rotate the ``heads`` rows of ``token`` in place."""
        h = tl.arange(0, BLOCK_H)[:, None]
        c = tl.arange(0, BLOCK_HALF)[None, :]
        mask = (h < heads) & (c < HALF)
        ptr1 = x_ptr + token * row_stride + h * head_stride + c
        x1 = tl.load(ptr1, mask=mask, other=0.0)
        out1, out2 = _rotated(x1, tl.load(ptr1 + HALF, mask=mask, other=0.0), cos1, cos2, sin1, sin2)
        tl.store(ptr1, out1, mask=mask)
        tl.store(ptr1 + HALF, out2, mask=mask)

    @triton.jit
    def _cos_sin(pos_ptr, table_ptr, token, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
        """fp32 ``[1, BLOCK_HALF]`` tiles ``cos1, cos2, sin1, sin2`` of the position of ``token``."""
        c = tl.arange(0, BLOCK_HALF)[None, :]
        cmask = c < HALF
        row = table_ptr + tl.load(pos_ptr + token).to(tl.int64) * (4 * HALF)  # [2, D]: cos, then signed sin
        cos1 = tl.load(row + c, mask=cmask, other=0.0).to(tl.float32)
        cos2 = tl.load(row + HALF + c, mask=cmask, other=0.0).to(tl.float32)
        sin1 = tl.load(row + 2 * HALF + c, mask=cmask, other=0.0).to(tl.float32)
        sin2 = tl.load(row + 3 * HALF + c, mask=cmask, other=0.0).to(tl.float32)
        return cos1, cos2, sin1, sin2

    @triton.jit
    def _rotary_kernel(
        q_ptr, k_ptr, pos_ptr, table_ptr, q_row_stride, q_head_stride, k_row_stride, k_head_stride, heads,
        kv_heads, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    ):  # fmt: skip
        token = tl.program_id(0).to(tl.int64)
        cos1, cos2, sin1, sin2 = _cos_sin(pos_ptr, table_ptr, token, HALF, BLOCK_HALF)
        _rotate(q_ptr, q_row_stride, q_head_stride, token, heads, cos1, cos2, sin1, sin2, HALF, BLOCK_HALF, BLOCK_HQ)
        _rotate(k_ptr, k_row_stride, k_head_stride, token, kv_heads, cos1, cos2, sin1, sin2, HALF, BLOCK_HALF,
                BLOCK_HK)  # fmt: skip

    @triton.jit
    def _rotary_write_kv_kernel(
        q_ptr, k_ptr, v_ptr, kv_ptr, pos_ptr, table_ptr, slot_ptr, source_ptr,
        q_row_stride, q_head_stride, k_row_stride, k_head_stride, v_row_stride, v_head_stride, heads, kv_heads,
        layer_offset, block_size, stride_block, stride_head, stride_tok, stride_kind,
        HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
        HAS_SOURCE: tl.constexpr,
    ):  # fmt: skip
        token = tl.program_id(0).to(tl.int64)
        cos1, cos2, sin1, sin2 = _cos_sin(pos_ptr, table_ptr, token, HALF, BLOCK_HALF)
        _rotate(q_ptr, q_row_stride, q_head_stride, token, heads, cos1, cos2, sin1, sin2, HALF, BLOCK_HALF, BLOCK_HQ)
        if HAS_SOURCE:  # the row of k/v this slot takes (CUDA-graph padding repeats a real row)
            source = tl.load(source_ptr + token).to(tl.int64)
            cos1, cos2, sin1, sin2 = _cos_sin(pos_ptr, table_ptr, source, HALF, BLOCK_HALF)
        else:
            source = token
        slot = tl.load(slot_ptr + token).to(tl.int64)
        h = tl.arange(0, BLOCK_HK)[:, None]
        c = tl.arange(0, BLOCK_HALF)[None, :]
        mask = (h < kv_heads) & (c < HALF)
        dst = kv_ptr + layer_offset + (slot // block_size) * stride_block + (slot % block_size) * stride_tok
        dst += h * stride_head + c
        k1_ptr = k_ptr + source * k_row_stride + h * k_head_stride + c
        k1 = tl.load(k1_ptr, mask=mask, other=0.0)
        out1, out2 = _rotated(k1, tl.load(k1_ptr + HALF, mask=mask, other=0.0), cos1, cos2, sin1, sin2)
        tl.store(dst, out1, mask=mask)
        tl.store(dst + HALF, out2, mask=mask)
        v1_ptr = v_ptr + source * v_row_stride + h * v_head_stride + c
        tl.store(dst + stride_kind, tl.load(v1_ptr, mask=mask), mask=mask)
        tl.store(dst + stride_kind + HALF, tl.load(v1_ptr + HALF, mask=mask), mask=mask)
