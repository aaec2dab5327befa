"""Rotary position embedding applied in place to Q and K, rotate-half (HF) convention.

``cos_sin_table`` is ``RotaryEmbedding.table`` of ``common.engine.model``: ``[max_positions, 2, head_dim]``
in the model dtype, row ``p`` holding ``cos`` and the signed ``sin`` (first half negated) of position
``p``, so ``rope(x) = x * cos + roll(x, D/2) * sin``.  The kernel rounds where the reference rounds
(each product, then the sum, in the tensor dtype), so fp16/bf16 results match the reference exactly;
in fp32 a GPU may contract a product and the sum into one FMA (an ulp apart).

One program rotates every head of Q and K of one token: ``[heads, D/2]`` tiles of both halves of the
rows, the token's cos/sin row loaded once.  Q and K may be strided views (e.g. of a fused qkv output):
rows and heads take any stride, the head dimension must be contiguous.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the reference still works
    triton = None


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


def apply_rotary_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_table: torch.Tensor) -> None:
    """Triton ``apply_rotary_reference`` (same contract; ``cos_sin_table`` contiguous, same dtype as q and k)."""
    n, heads, dim = q.shape
    kv_heads = k.shape[1]
    if k.shape != (n, kv_heads, dim) or positions.shape != (n,) or cos_sin_table.shape[1:] != (2, dim):
        raise ValueError(
            f"apply_rotary_: q {tuple(q.shape)}, k {tuple(k.shape)}, positions {tuple(positions.shape)}, "
            f"table {tuple(cos_sin_table.shape)}"
        )
    if q.stride(2) != 1 or k.stride(2) != 1 or not cos_sin_table.is_contiguous() or dim % 2:
        raise ValueError("apply_rotary_: q and k need a contiguous even head dimension, the table contiguous")
    if not q.dtype == k.dtype == cos_sin_table.dtype:
        raise ValueError(f"apply_rotary_: dtypes q {q.dtype}, k {k.dtype}, table {cos_sin_table.dtype} differ")
    if n == 0:
        return
    _rotary_kernel[(n,)](
        q, k, positions, cos_sin_table, q.stride(0), q.stride(1), k.stride(0), k.stride(1), heads, kv_heads,
        HALF=dim // 2, BLOCK_HALF=triton.next_power_of_2(dim // 2),
        BLOCK_HQ=triton.next_power_of_2(heads), BLOCK_HK=triton.next_power_of_2(kv_heads),
    )  # fmt: skip


if triton is not None:

    @triton.jit
    def _rotate(x_ptr, row_stride, head_stride, token, heads, cos1, cos2, sin1, sin2,
                HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr):  # fmt: skip
        """Rotate the ``heads`` rows of ``token``: ``(x1, x2) -> (x1*cos1 + x2*sin1, x2*cos2 + x1*sin2)``,
        each product exact in fp32 for 16-bit inputs, rounded to the dtype, then the sum rounded."""
        h = tl.arange(0, BLOCK_H)[:, None]
        c = tl.arange(0, BLOCK_HALF)[None, :]
        mask = (h < heads) & (c < HALF)
        ptr1 = x_ptr + token * row_stride + h * head_stride + c
        x1 = tl.load(ptr1, mask=mask, other=0.0)
        dtype = x1.dtype
        x1 = x1.to(tl.float32)
        x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0).to(tl.float32)
        out1 = (x1 * cos1).to(dtype).to(tl.float32) + (x2 * sin1).to(dtype).to(tl.float32)
        out2 = (x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)
        tl.store(ptr1, out1.to(dtype), mask=mask)
        tl.store(ptr1 + HALF, out2.to(dtype), mask=mask)

    @triton.jit
    def _rotary_kernel(
        q_ptr, k_ptr, pos_ptr, table_ptr, q_row_stride, q_head_stride, k_row_stride, k_head_stride, heads,
        kv_heads, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    ):  # fmt: skip
        token = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK_HALF)[None, :]
        cmask = c < HALF
        row = table_ptr + tl.load(pos_ptr + token).to(tl.int64) * (4 * HALF)  # [2, D]: cos, then signed sin
        cos1 = tl.load(row + c, mask=cmask, other=0.0).to(tl.float32)
        cos2 = tl.load(row + HALF + c, mask=cmask, other=0.0).to(tl.float32)
        sin1 = tl.load(row + 2 * HALF + c, mask=cmask, other=0.0).to(tl.float32)
        sin2 = tl.load(row + 3 * HALF + c, mask=cmask, other=0.0).to(tl.float32)
        _rotate(q_ptr, q_row_stride, q_head_stride, token, heads, cos1, cos2, sin1, sin2, HALF, BLOCK_HALF, BLOCK_HQ)
        _rotate(k_ptr, k_row_stride, k_head_stride, token, kv_heads, cos1, cos2, sin1, sin2, HALF, BLOCK_HALF,
                BLOCK_HK)  # fmt: skip
