"""SwiGLU activation: ``silu(gate) * up`` of the fused gate/up projection, in one pass.

``gate_up`` ``[N, 2*I]`` is ``MLP.gate_up_proj``'s output (gate columns first).  The kernel rounds
as torch does: ``silu`` computed in fp32 and rounded to the dtype, then the product rounded.  A 2-D
grid: one row per program along axis 0, ``BLOCK`` columns per program along axis 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.engine.kernels import pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install: the reference still works
    triton = None


def available() -> bool:
    """Whether the Triton kernel can run (``triton`` importable)."""
    return triton is not None


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """``gate_up`` ``[N, 2*I]`` -> ``silu(gate_up[:, :I]) * gate_up[:, I:]`` ``[N, I]``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(gate_up: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Triton ``silu_and_mul_reference`` (``gate_up`` 2-D, contiguous columns; ``block`` columns a program)."""
    n, width = gate_up.shape
    if width % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"silu_and_mul: gate_up {tuple(gate_up.shape)} needs an even, contiguous last dimension")
    inter = width // 2
    out = torch.empty(n, inter, dtype=gate_up.dtype, device=gate_up.device)
    if n == 0:
        return out
    block = min(block, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(n, triton.cdiv(inter, block))](
        gate_up, out, gate_up.stride(0), inter, BLOCK=block, **pdl.options(gate_up)
    )
    return out


if triton is not None:

    @triton.jit
    def _silu_and_mul_kernel(in_ptr, out_ptr, in_stride, inter, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        pdl.wait(USE_PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        gate = tl.load(in_ptr + row * in_stride + cols, mask=mask, other=0.0)
        up = tl.load(in_ptr + row * in_stride + inter + cols, mask=mask, other=0.0).to(tl.float32)
        g = gate.to(tl.float32)
        silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
        tl.store(out_ptr + row * inter + cols, (silu * up).to(gate.dtype), mask=mask)
