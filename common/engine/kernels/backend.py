"""Which implementation of attention, norms, rotary and SiLU*mul the engine runs (``--attention-backend``).

``torch``: plain PyTorch (any device; the CPU default).  ``triton``: the kernels of this package (paged
attention reading the KV blocks in place, fused residual-add RMSNorm, in-place rotary, SiLU*mul); they
run on CUDA, or on CPU under Triton's interpreter (``TRITON_INTERPRET=1``, how the tests run them).
``--decode-gemv``: whether the triton backend runs small steps' projections as Triton GEMVs too.
"""

from __future__ import annotations

import os

import torch

from common.config import require
from common.engine.kernels import paged_attention


def interpreted() -> bool:
    """Whether Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_attention_backend(name: str, device: torch.device) -> str:
    """``"torch"`` or ``"triton"`` for ``--attention-backend`` ``name`` on ``device``: ``auto`` is triton on
    CUDA when Triton is importable, else torch.  Raises ``ConfigError`` when triton cannot run there."""
    if name == "auto":
        return "triton" if device.type == "cuda" and paged_attention.available() else "torch"
    if name == "triton":
        require(paged_attention.available(), "attention_backend", "triton: the triton package is not installed")
        require(
            device.type == "cuda" or interpreted(),
            "attention_backend",
            f"triton: the kernels need a CUDA device (got {device}), or TRITON_INTERPRET=1 to interpret them on CPU",
        )
    return name


def resolve_decode_gemv(name: str, attention_backend: str, device: torch.device) -> bool:
    """Whether small steps run the Triton GEMVs (``--decode-gemv`` ``name``; ``attention_backend`` resolved):
    ``auto`` on CUDA with the triton backend.  Raises ``ConfigError`` for triton without the triton backend."""
    if name == "auto":
        return device.type == "cuda" and attention_backend == "triton"
    require(name == "torch" or attention_backend == "triton", "decode_gemv",
            "triton: needs --attention-backend triton (the GEMVs replace its projections)")  # fmt: skip
    return name == "triton"
