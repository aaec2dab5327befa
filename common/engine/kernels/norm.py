"""RMSNorm, and RMSNorm fused with the residual add before it (one read of each row, one write).

Math as ``common.engine.model.RMSNorm`` (HF): ``weight * (h.float() * rsqrt(mean(h²) + eps)).to(h.dtype)``,
where ``h`` is the input row, or for the fused form the new residual ``residual + x`` (rounded to the
model dtype, as ``x + attn_out`` is).  One Triton program normalizes one row held whole in registers
(``BLOCK`` = the next power of two >= hidden size); ``num_warps`` grows with the row.  fp32 sums of
squares are reduced in another order than torch's, so the outputs agree to an ulp or so of the rstd,
not bit for bit; the elementwise steps round exactly where torch rounds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.engine.kernels import pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the references still work
    triton = None


def available() -> bool:
    """Whether the Triton kernels can run (``triton`` importable)."""
    return triton is not None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x`` ``[..., hidden]`` -> RMSNorm of each row (a new tensor; dtype as ``weight * x``)."""
    return weight * F.rms_norm(x.float(), weight.shape, eps=eps).to(x.dtype)


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual += x`` in place, then ``(rms_norm(residual), residual)``."""
    residual.add_(x)
    return rms_norm_reference(residual, weight, eps), residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton ``rms_norm_reference``: ``x`` ``[..., hidden]`` with a contiguous last dimension."""
    rows = _rows(x)
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    _launch(rows, rows, weight, out, eps, has_residual=False)
    return out.view(x.shape)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``fused_add_rms_norm_reference``: ``residual`` (same shape and dtype as ``x``, its rows
    viewable as ``[-1, hidden]``) is updated in place and returned with the normalized rows."""
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"fused_add_rms_norm: residual {residual.shape} {residual.dtype}, x {x.shape} {x.dtype}")
    rows, res_rows = _rows(x), residual.view(-1, residual.shape[-1])
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    _launch(rows, res_rows, weight, out, eps, has_residual=True)
    return out.view(x.shape), residual


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, hidden]`` with unit column stride (a copy only if no such view exists)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch(x: torch.Tensor, res: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, eps: float,
            has_residual: bool) -> None:  # fmt: skip
    n_rows, hidden = x.shape
    if weight.shape != (hidden,) or not weight.is_contiguous():
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} for rows of {hidden} (contiguous expected)")
    if n_rows == 0:
        return
    block = triton.next_power_of_2(hidden)
    num_warps = min(max(block // 256, 1), 16)
    _rms_norm_kernel[(n_rows,)](
        x, res, weight, out, x.stride(0), res.stride(0), out.stride(0), hidden, eps,
        HAS_RESIDUAL=has_residual, BLOCK=block, num_warps=num_warps, **pdl.options(x),
    )  # fmt: skip


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr, x_stride, res_stride, out_stride, hidden, eps,
        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        pdl.wait(USE_PDL)
        h = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
            h = (h.to(tl.float32) + r.to(tl.float32)).to(res_ptr.dtype.element_ty)
            tl.store(res_ptr + row * res_stride + cols, h, mask=mask)
        hf = h.to(tl.float32)
        mean_sq = tl.math.div_rn(tl.sum(hf * hf, axis=0), hidden.to(tl.float32))
        rstd = tl.math.div_rn(1.0, tl.sqrt_rn(mean_sq + eps))
        normed = (hf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * out_stride + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)
