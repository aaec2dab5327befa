"""Copies between host and device that never make the host wait for the device's queued work.

A copy from pageable host memory may synchronize with the stream (the driver stages it), and a
blocking one always does: under async scheduling that would wait for the step in flight.  So host
data goes through pinned memory with ``non_blocking`` copies (the caching host allocator keeps a
pinned buffer until its copy ran); on CPU these are plain tensors.
"""

from __future__ import annotations

import torch


def to_device(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(data, dtype=dtype, device=device)`` without a host sync."""
    cuda = device.type == "cuda"
    return torch.tensor(data, dtype=dtype, pin_memory=cuda).to(device, non_blocking=cuda)


def to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    """Start copying ``t`` to pinned host memory; read it once the stream passed this point (an event
    recorded after the copy completed)."""
    if t is None or t.device.type == "cpu":
        return t
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
