"""Skinny matmuls of decode steps ("GEMV"): ``x @ weight.T (+ bias)`` for at most ``MAX_ROWS`` rows of ``x``.

``weight`` is ``[N, K]`` as ``nn.Linear`` stores it (row-major, K contiguous: a program's loads run along K),
accumulated in float32.  A program computes ``BLOCK_N`` outputs of every row over its share of K
(``split_k`` programs per output block; with more than one, their float32 partial sums go to a workspace and
a second, tiny kernel adds them up with the bias).  cuBLAS picks tiles for large M; at M <= 8 its kernels
leave much of the H200's bandwidth unused (``bench/gemv_gpu.py`` measures both).

``norm_gemv`` fuses what runs before and after the decoder layer's projections into the same launch:
- prologue: the RMSNorm (with the residual add before it) of ``norm.fused_add_rms_norm``.  Every program
  recomputes its rows' sum of squares over the whole row (a few KB from L2); the programs of output block 0
  write the new residual (a new tensor: others may still read the old one).  Rounded as ``norm`` rounds.
- epilogue (``silu_mul``): ``weight`` is the fused gate/up ``[2I, K]``; a program computes gate rows
  ``[n, n + BLOCK_N)`` and up rows ``[I + n, I + n + BLOCK_N)`` and writes ``silu(g) * u`` ``[M, I]``,
  rounded as ``activation.silu_and_mul`` rounds (needs ``split_k`` 1).
Each has a PyTorch reference (``gemv_reference``, ``norm_gemv_reference``).  One row of at most
``row_gemv.MAX_K`` (a batch-1 decode step) runs ``row_gemv``'s persistent kernel instead, by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.engine.kernels import activation, norm, pdl, row_gemv
from common.engine.kernels.row_gemv import RowConfig

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the references still work
    triton = None

# Measured on an H200 (``bench.gemv_gpu``, docs/benchmarks.md): at one row the GEMVs beat cuBLAS on every
# projection of the 1B shape (1.07-1.43x; with the fused norm and SiLU*mul, 117 us off a step) and tie or beat it on
# the 8B's (0.99-1.15x); at two
# rows the fused forms already lose (0.76-0.84x), at eight every tile loses 1.5-3x (cuBLAS's tensor-core tiles).
MAX_ROWS = 8  # the kernel's limit
DECODE_MAX_ROWS = 1  # the model's decode steps use the GEMVs up to this many rows, cuBLAS above
BLOCK_N = 2  # outputs a program: the best tile for every projection of the 1B and 8B shapes at 1 and 8 rows
MAX_BLOCK_K = 2048  # of K an iteration (a gate_up tile with its SiLU*mul holds two of them)


@dataclass(frozen=True, slots=True)
class GemvConfig:
    """Tile of one program: ``block_n`` outputs by ``block_k`` of K an iteration; ``split_k`` programs share K."""

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4


def pick_config(n: int, k: int, silu_mul: bool = False) -> GemvConfig:
    """The default tile for ``n`` outputs over ``k`` (any rows): ``BLOCK_N`` outputs (``n / 2`` programs: at
    least 1,024 for these shapes, ~8 per SM), all of ``k`` up to ``MAX_BLOCK_K`` an iteration (>= 64: 16-byte
    loads).  ``silu_mul`` does not change it."""
    return GemvConfig(BLOCK_N, max(64, min(triton.next_power_of_2(k), MAX_BLOCK_K)))


def default_config(m: int, n: int, k: int, silu_mul: bool = False) -> GemvConfig | RowConfig:
    """What a call of ``m`` rows, ``n`` outputs over ``k`` runs without a config: the one-row kernel for one row
    of at most ``row_gemv.MAX_K``, else ``pick_config``'s tile."""
    return row_gemv.pick_config(k) if m == 1 and k <= row_gemv.MAX_K else pick_config(n, k, silu_mul)


def gemv_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``."""
    return F.linear(x, weight, bias)


def norm_gemv_reference(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
    bias: torch.Tensor | None = None, silu_mul: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, new_residual)``: ``h = x + residual`` (``residual`` None: ``x``, returned as the residual),
    ``out = F.linear(rms_norm(h), weight, bias)``, then ``silu_and_mul`` of it when ``silu_mul``.
    ``residual`` is left unchanged."""
    if residual is None:
        h, residual = norm.rms_norm_reference(x, norm_weight, eps), x
    else:
        h, residual = norm.fused_add_rms_norm_reference(x, residual.clone(), norm_weight, eps)
    out = F.linear(h, weight, bias)
    return (activation.silu_and_mul_reference(out) if silu_mul else out), residual


def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: GemvConfig | RowConfig | None = None
) -> torch.Tensor:
    """Triton ``gemv_reference`` (``x`` ``[M <= MAX_ROWS, K]``; same signature as ``F.linear``)."""
    return _launch(x, None, None, 0.0, weight, bias, False, config)[0]


def norm_gemv(
    x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
    bias: torch.Tensor | None = None, silu_mul: bool = False, config: GemvConfig | RowConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``norm_gemv_reference``, one launch (the new residual is a new tensor; ``residual`` unchanged)."""
    if norm_weight.shape != (x.shape[1],) or not norm_weight.is_contiguous():
        raise ValueError(f"norm_gemv: norm weight {tuple(norm_weight.shape)} for rows of {x.shape[1]}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"norm_gemv: residual {residual.shape} {residual.dtype}, x {x.shape} {x.dtype}")
    return _launch(x, residual, norm_weight, eps, weight, bias, silu_mul, config)


def _launch(x, residual, norm_weight, eps, weight, bias, silu_mul, config):
    """Checks the shapes, then runs ``row_gemv``'s kernel (``config`` a ``RowConfig``; by default for one row of
    at most ``row_gemv.MAX_K``) or ``_gemv_kernel`` (and ``_split_k_reduce_kernel`` when K is split)."""
    (m, k), (n, k_w) = x.shape, weight.shape
    if k_w != k or m > MAX_ROWS or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"gemv: x {tuple(x.shape)} (at most {MAX_ROWS} rows) and weight {tuple(weight.shape)} "
                         "need a common, contiguous K")  # fmt: skip
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"gemv: bias {tuple(bias.shape)} for {n} outputs")
    if silu_mul and n % 2:
        raise ValueError(f"gemv: silu_mul needs an even number of gate/up outputs, got {n}")
    n_out = n // 2 if silu_mul else n
    config = config or default_config(m, n_out, k, silu_mul)
    if isinstance(config, RowConfig) and (m != 1 or k > row_gemv.MAX_K):
        raise ValueError(f"gemv: the one-row kernel takes one row of at most {row_gemv.MAX_K}, got x {tuple(x.shape)}")
    if silu_mul and isinstance(config, GemvConfig) and config.split_k != 1:
        raise ValueError("gemv: silu_mul needs split_k 1 (the activation needs the whole sum)")
    out = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    new_residual = x if residual is None else torch.empty_like(x)
    if m == 0:
        return out, new_residual
    if isinstance(config, RowConfig):
        row_gemv.launch(x, residual, new_residual, norm_weight, eps, weight, bias, out, silu_mul, config)
        return out, new_residual
    split = config.split_k
    k_per_split = triton.cdiv(triton.cdiv(k, split), config.block_k) * config.block_k
    partial = out if split == 1 else torch.empty(split, m, n_out, dtype=torch.float32, device=x.device)
    res = residual if residual is not None else x
    _gemv_kernel[(triton.cdiv(n_out, config.block_n), split)](
        x, weight, bias if bias is not None else weight, partial, res, new_residual,
        norm_weight if norm_weight is not None else weight,
        n_out, k, x.stride(0), weight.stride(0), partial.stride(-2), res.stride(0), new_residual.stride(0),
        eps, k_per_split, HAS_BIAS=bias is not None and split == 1, NORM=norm_weight is not None,
        ADD_RESIDUAL=residual is not None, SILU_MUL=silu_mul, ROWS=m, BLOCK_M=triton.next_power_of_2(m),
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps, **pdl.options(x),
    )  # fmt: skip
    if split > 1:
        block = min(1024, triton.next_power_of_2(n_out))
        _split_k_reduce_kernel[(m, triton.cdiv(n_out, block))](
            partial, bias if bias is not None else partial, out, m, n_out,
            SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=block, **pdl.options(x),
        )  # fmt: skip
    return out, new_residual


if triton is not None:

    @triton.jit
    def _row_input(x_ptr, res_ptr, row, ks, mask, x_stride, res_stride, ADD_RESIDUAL: tl.constexpr):
        """``x[row, ks]`` (plus the residual's, rounded to the dtype as torch rounds ``x + residual``);
        ``row`` a scalar or a column of rows."""
        h = tl.load(x_ptr + row * x_stride + ks, mask=mask, other=0.0)
        if ADD_RESIDUAL:
            r = tl.load(res_ptr + row * res_stride + ks, mask=mask, other=0.0)
            h = (h.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        return h

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, b_ptr, out_ptr, res_ptr, res_out_ptr, nw_ptr,
        N, K, x_stride, w_stride, out_stride, res_stride, res_out_stride, eps, k_per_split,
        HAS_BIAS: tl.constexpr, NORM: tl.constexpr, ADD_RESIDUAL: tl.constexpr, SILU_MUL: tl.constexpr,
        ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):  # fmt: skip
        """Outputs ``[pid_n * BLOCK_N, +BLOCK_N)`` of the ``ROWS`` rows over K split ``pid_k``: the weight tile
        is loaded once an iteration (the next one while the current is multiplied; the first before
        ``pdl.wait``, while the kernel before may still run) and multiplied by each row in turn (registers do
        not grow with the rows); accumulators are ``[BLOCK_N, BLOCK_M]`` (outputs by rows)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = tl.arange(0, BLOCK_M)
        row_mask = rows < ROWS
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        offs_k = tl.arange(0, BLOCK_K)
        dtype = x_ptr.dtype.element_ty
        w_rows = w_ptr + cols[:, None].to(tl.int64) * w_stride
        k_start = pid_k * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        ks = k_start + offs_k
        w_mask = col_mask[:, None] & (ks < k_end)[None, :]
        w = tl.load(w_rows + ks[None, :], mask=w_mask, other=0.0)
        up = w
        if SILU_MUL:
            up = tl.load(w_rows + N * w_stride + ks[None, :], mask=w_mask, other=0.0)
        pdl.wait(USE_PDL)
        if NORM:  # each row's rstd, from the whole row
            sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + offs_k
                mask = row_mask[:, None] & (ks < K)[None, :]
                h = _row_input(x_ptr, res_ptr, rows[:, None], ks[None, :], mask, x_stride, res_stride, ADD_RESIDUAL)
                hf = h.to(tl.float32)
                sum_sq += tl.sum(hf * hf, axis=1)
            rstd = tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(sum_sq, K.to(tl.float32)) + eps))
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k0 in range(0, k_per_split, BLOCK_K):
            ks = k_start + k0 + offs_k
            k_mask = ks < k_end
            w_tile, up_tile = w.to(tl.float32), up.to(tl.float32)
            next_ks = ks + BLOCK_K
            next_mask = col_mask[:, None] & (next_ks < k_end)[None, :]
            w = tl.load(w_rows + next_ks[None, :], mask=next_mask, other=0.0)
            if SILU_MUL:
                up = tl.load(w_rows + N * w_stride + next_ks[None, :], mask=next_mask, other=0.0)
            if NORM:
                nw = tl.load(nw_ptr + ks, mask=k_mask, other=0.0).to(tl.float32)
            for m in tl.static_range(ROWS):
                a = _row_input(x_ptr, res_ptr, m, ks, k_mask, x_stride, res_stride, ADD_RESIDUAL)
                if ADD_RESIDUAL:
                    if pid_n == 0:
                        tl.store(res_out_ptr + m * res_out_stride + ks, a, mask=k_mask)
                if NORM:
                    rstd_m = tl.sum(tl.where(rows == m, rstd, 0.0))
                    a = (nw * (a.to(tl.float32) * rstd_m).to(dtype).to(tl.float32)).to(dtype)
                af = a.to(tl.float32)[None, :]
                is_m = (rows == m)[None, :]
                acc += tl.where(is_m, tl.sum(w_tile * af, axis=1)[:, None], 0.0)
                if SILU_MUL:
                    acc_up += tl.where(is_m, tl.sum(up_tile * af, axis=1)[:, None], 0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[:, None]
            if SILU_MUL:
                acc_up += tl.load(b_ptr + N + cols, mask=col_mask, other=0.0).to(tl.float32)[:, None]
        if SILU_MUL:
            g = acc.to(dtype).to(tl.float32)
            silu = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
            acc = silu * acc_up.to(dtype).to(tl.float32)
        out_ptrs = out_ptr + pid_k * ROWS * N + rows[None, :] * out_stride + cols[:, None]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=col_mask[:, None] & row_mask[None, :])

    @triton.jit
    def _split_k_reduce_kernel(
        partial_ptr, b_ptr, out_ptr, M, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        """``out[row] = sum over the splits of partial[split, row] (+ bias)``, rounded to the output dtype."""
        pdl.wait(USE_PDL)
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < N
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for split in tl.static_range(SPLIT_K):
            acc += tl.load(partial_ptr + (split * M + row) * N + cols, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * N + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)
