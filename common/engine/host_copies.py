"""Copies between host and device that never make the host wait for the device's queued work.

A copy from pageable host memory may synchronize with the stream (the driver stages it), and a
blocking one always does: under async scheduling that would wait for the step in flight.  So host
data goes through pinned memory with ``non_blocking`` copies (the caching host allocator keeps a
pinned buffer until its copy ran); on CPU these are plain tensors.
"""

from __future__ import annotations

import torch

from common.arith import ceil_div


def to_device(data: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(data, dtype=dtype, device=device)`` without a host sync."""
    cuda = device.type == "cuda"
    return torch.tensor(data, dtype=dtype, pin_memory=cuda).to(device, non_blocking=cuda)


# Triton specialises a kernel on whether each pointer argument is 16-byte aligned: a view at another alignment
# than the warm-up's compiles a new variant of the kernel in the middle of serving (seconds on a GPU: the likely
# cause of the 0.6-0.9 s prefill steps seen on the H200 when two prompts met, docs/benchmarks.md).
ALIGN_BYTES = 16


def to_device_aligned(segments: list[list], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """``to_device`` of each segment in one copy: views of one buffer, each starting ``ALIGN_BYTES``-aligned
    (the buffer is, and each segment is padded to a multiple of it), whatever the segments' lengths."""
    per = max(1, ALIGN_BYTES // dtype.itemsize)
    spans = [ceil_div(len(segment), per) * per for segment in segments]
    flat: list = []
    for segment, span in zip(segments, spans):
        flat += segment
        flat += [0] * (span - len(segment))
    views = to_device(flat, dtype, device).split(spans)
    return [view[: len(segment)] for view, segment in zip(views, segments)]


def to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    """Start copying ``t`` to pinned host memory; read it once the stream passed this point (an event
    recorded after the copy completed)."""
    if t is None or t.device.type == "cpu":
        return t
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)


class Staging:
    """Pinned host buffers (plain ones on CPU) of ``shape``, used in turn to stage host→device copies:
    ``next()`` hands out the following one once the copies queued from it last time ran (an event recorded by
    ``queued()`` after them; normally long done: with async scheduling the step that read it has retired)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, count: int = 2):
        cuda = device.type == "cuda"
        self.buffers = [torch.zeros(shape, dtype=dtype, pin_memory=cuda) for _ in range(count)]
        self.events = [torch.cuda.Event() for _ in range(count)] if cuda else []  # one per buffer, re-recorded
        self.index = count - 1

    def next(self) -> torch.Tensor:
        """The next buffer, free to overwrite."""
        self.index = (self.index + 1) % len(self.buffers)
        if self.events:
            self.events[self.index].synchronize()  # an event never recorded returns at once
        return self.buffers[self.index]

    def queued(self) -> None:
        """Every copy from the current buffer is queued on the current stream."""
        if self.events:
            self.events[self.index].record()
