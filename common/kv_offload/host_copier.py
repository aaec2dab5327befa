"""``HostCopier``: one rank's host-memory copy of offloaded KV blocks, and the copies in and out.

``host[slot]`` has the shape of one of this rank's device blocks (its KV heads,
every layer), so under tensor parallelism each rank holds its slice of every
offloaded block under the same slot numbers (rank 0's ``HostPool`` decides them).
Pinned memory when the cache is on CUDA.

Copies out (``store``) run off the step's critical path: on CUDA on a side
stream that waits for the step's work so far, on CPU on one copy thread.
``wait_stores`` returns once every store issued before it finished; the
runner calls it at the start of every step, so once a step ran on every
rank the previous step's stores are done and their device blocks may be
reused.  Copies in (``load``) are ordered before the step's forward pass.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from common.engine.kv_cache import KVCache


class HostCopier:
    def __init__(self, kv_cache: KVCache, num_slots: int):
        data = kv_cache.data
        self.kv_cache = kv_cache
        self.cuda = data.device.type == "cuda"
        self.host = torch.empty((num_slots, *data.shape[1:]), dtype=data.dtype, pin_memory=self.cuda)
        self.stream = torch.cuda.Stream(data.device) if self.cuda else None
        self.thread = None if self.cuda else ThreadPoolExecutor(1, thread_name_prefix="kv-offload")
        self.in_flight: list[Future | torch.cuda.Event] = []

    def load(self, pairs: list[tuple[int, int]]) -> None:
        """Copy host ``slot`` into device ``block`` for each ``(slot, block)``, before the step's compute."""
        data = self.kv_cache.data
        for slot, block in pairs:
            data[block].copy_(self.host[slot], non_blocking=self.cuda)

    def store(self, pairs: list[tuple[int, int]]) -> None:
        """Start copying device ``block`` into host ``slot`` for each ``(slot, block)``; returns at once."""
        if not pairs:
            return
        if self.stream is None:
            self.in_flight.append(self.thread.submit(self._copy_out, pairs))
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.kv_cache.data.device))
        with torch.cuda.stream(self.stream):
            self._copy_out(pairs)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.in_flight.append(done)

    def wait_stores(self) -> None:
        """Block until every store issued so far finished (a failed copy raises here)."""
        for pending in self.in_flight:
            if isinstance(pending, Future):
                pending.result()
            else:
                pending.synchronize()
        self.in_flight.clear()

    def close(self) -> None:
        self.wait_stores()
        if self.thread is not None:
            self.thread.shutdown()

    def _copy_out(self, pairs: list[tuple[int, int]]) -> None:
        data = self.kv_cache.data
        for slot, block in pairs:
            self.host[slot].copy_(data[block], non_blocking=self.cuda)
