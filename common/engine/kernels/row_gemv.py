"""The one-row GEMV of a batch-1 decode step: a persistent grid that holds the activation row in registers.

``gemv._launch`` runs it for one row of ``x`` when K is at most ``MAX_K`` (the row and a weight tile of every
output block fit a program's registers).  The grid is ``programs_per_sm`` programs per SM (at most one per
output block); program ``p`` loads the row once (adding the residual and applying the RMSNorm of the fused
forms once, not once per output block), then walks output blocks ``p, p + grid, ...``, loading the next
block's ``[block_n, K]`` weight tile while it multiplies the current one.  Its first tile is loaded before
``pdl.wait``: with programmatic dependent launch the weights stream while the kernel before still runs.
Against ``gemv``'s tiled kernel (a program per ``block_n`` outputs, re-reading and re-normalising the row
each time) 16 layers of the Llama-3.2-1B shape's four projections took 548 instead of 692 us on an H200,
within 1.2x of their weights' read at the copy rate.  Rounds as the tiled kernel rounds (float32 sums; for
K beyond one tiled block the sum's order differs).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from common.engine.kernels import pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install
    triton = None

MAX_K = 8192  # the longest row a program holds (with one weight tile of block_n rows of it, and the next)
INTERPRETER_PROGRAMS = 3  # the grid off a GPU (Triton's interpreter): small, so programs walk several blocks


@dataclass(frozen=True, slots=True)
class RowConfig:
    """``block_n`` outputs a tile; ``programs_per_sm`` programs per SM walk the output blocks."""

    block_n: int = 2
    num_warps: int = 8
    programs_per_sm: int = 4


def pick_config(k: int) -> RowConfig:
    """Measured on an H200 (16 layers of the 1B shape in a CUDA graph, each projection's tile swept): 2 outputs a
    tile, 8 warps, 4 programs per SM, 2 for rows longer than 4,096 (their tiles hold more registers)."""
    return RowConfig(programs_per_sm=4 if k <= 4096 else 2)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def grid_size(device: torch.device, blocks: int, config: RowConfig) -> int:
    """Programs for ``blocks`` output blocks on ``device``."""
    if device.type != "cuda":
        return min(blocks, INTERPRETER_PROGRAMS)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return min(blocks, _sm_count(index) * config.programs_per_sm)


def launch(x, residual, new_residual, norm_weight, eps, weight, bias, out, silu_mul, config: RowConfig) -> None:
    """``out[0] = (silu_mul of) row(x) @ weight.T (+ bias)``; shapes checked by ``gemv._launch``."""
    n, k = out.shape[1], x.shape[1]
    blocks = triton.cdiv(n, config.block_n)
    _row_gemv_kernel[(grid_size(x.device, blocks, config),)](
        x, residual if residual is not None else x, new_residual, norm_weight if norm_weight is not None else weight,
        weight, bias if bias is not None else weight, out, n, k, weight.stride(0), eps,
        NORM=norm_weight is not None, ADD_RESIDUAL=residual is not None, SILU_MUL=silu_mul, HAS_BIAS=bias is not None,
        BLOCK_N=config.block_n, BLOCK_K=triton.next_power_of_2(k), num_warps=config.num_warps, **pdl.options(x),
    )  # fmt: skip


if triton is not None:

    @triton.jit
    def _tile(w_ptr, first, cols, ks, k_mask, N, w_stride):
        """Weight rows ``first + cols`` (``cols < N``; ``first``: 0, or ``N`` for the up rows of gate_up)."""
        mask = (cols < N)[:, None] & k_mask[None, :]
        return tl.load(w_ptr + (first + cols)[:, None].to(tl.int64) * w_stride + ks[None, :], mask=mask, other=0.0)

    @triton.jit
    def _row_gemv_kernel(
        x_ptr, res_ptr, res_out_ptr, nw_ptr, w_ptr, b_ptr, out_ptr, N, K, w_stride, eps,
        NORM: tl.constexpr, ADD_RESIDUAL: tl.constexpr, SILU_MUL: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
    ):  # fmt: skip
        """Program ``p`` of the grid: the row once, then output blocks ``p, p + grid, ...`` (see the module)."""
        pid = tl.program_id(0)
        step = tl.num_programs(0) * BLOCK_N
        ks = tl.arange(0, BLOCK_K)
        k_mask = ks < K
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        w = _tile(w_ptr, 0, cols, ks, k_mask, N, w_stride)
        up = w
        if SILU_MUL:
            up = _tile(w_ptr, N, cols, ks, k_mask, N, w_stride)
        pdl.wait(USE_PDL)
        dtype = x_ptr.dtype.element_ty
        h = tl.load(x_ptr + ks, mask=k_mask, other=0.0)
        if ADD_RESIDUAL:
            h = (h.to(tl.float32) + tl.load(res_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)).to(dtype)
            if pid == 0:
                tl.store(res_out_ptr + ks, h, mask=k_mask)
        a = h.to(tl.float32)
        if NORM:
            rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(tl.sum(a * a, axis=0), K.to(tl.float32)) + eps))
            nw = tl.load(nw_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
            a = (nw * (a * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        for first in range(pid * BLOCK_N, N, step):
            cols = first + tl.arange(0, BLOCK_N)
            w_cur, up_cur = w.to(tl.float32), up.to(tl.float32)
            w = _tile(w_ptr, 0, cols + step, ks, k_mask, N, w_stride)
            if SILU_MUL:
                up = _tile(w_ptr, N, cols + step, ks, k_mask, N, w_stride)
            acc = tl.sum(w_cur * a[None, :], axis=1)
            if HAS_BIAS:
                acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
            if SILU_MUL:
                acc_up = tl.sum(up_cur * a[None, :], axis=1)
                if HAS_BIAS:
                    acc_up += tl.load(b_ptr + N + cols, mask=cols < N, other=0.0).to(tl.float32)
                g = acc.to(dtype).to(tl.float32)
                silu = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
                acc = silu * acc_up.to(dtype).to(tl.float32)
            tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < N)
