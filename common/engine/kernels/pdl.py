"""Programmatic dependent launch (PDL) for the decode step's Triton kernels.

On Hopper and newer GPUs a kernel launched with PDL may start while the kernel before it in the stream is
still running: its programs are scheduled once every program of that kernel has called
``launch_dependents`` (or exited), and ``wait`` blocks until that kernel has finished and its writes are
visible.  Inside a CUDA graph of ~130 small kernels this hides the launch and ramp-up of each behind the
tail of the one before, and a GEMV can stream its weights before ``wait``.

Contract of a kernel compiled with ``USE_PDL``: before ``wait(USE_PDL)`` it reads only memory no kernel
writes while the engine runs (weights) and writes nothing; ``wait`` also calls ``launch_dependents``, so
the next kernel may prefetch while this one computes.  A kernel launched without PDL (torch's, cuBLAS's)
waits for the one before it as usual, so PDL and plain launches mix freely in a stream.

``options(tensor)`` gives the launch keywords: PDL on a CUDA device of compute capability >= 9 unless
``PDSERVE_PDL=0``; never in Triton's interpreter (``USE_PDL`` False there: its instructions have no
interpreter form).
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only install
    triton = None

ENV = "PDSERVE_PDL"


@functools.cache
def _enabled(device_index: int) -> bool:
    if os.environ.get(ENV, "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` are launched with PDL."""
    return device.type == "cuda" and _enabled(device.index if device.index is not None else torch.cuda.current_device())


def options(tensor: torch.Tensor) -> dict[str, bool]:
    """Keywords for a launch on ``tensor``'s device: ``USE_PDL`` (the kernels' constexpr) and ``launch_pdl``."""
    on = enabled(tensor.device)
    return {"USE_PDL": on, "launch_pdl": on}


if triton is not None:

    @triton.jit
    def wait(USE_PDL: tl.constexpr):
        """With ``USE_PDL``: wait for the kernel before this one, then let the next one start."""
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
