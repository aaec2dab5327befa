"""``OffloadConnector``: the CPU offload tier (``OffloadTier`` in the engine) as a ``KVConnector``.

Loads and stores are engine commands (``AsyncEngine``), so the tier is only
touched by the engine thread; a load names the blocks at once and the copies
run before the request's first step.
"""

from __future__ import annotations

import time

from common.engine.async_engine import AsyncEngine
from common.engine.kv_cache import KVCache
from common.kv_offload.connector import BlockLoad, KVConnector
from common.kv_transfer.reader import ReadStats


class OffloadConnector(KVConnector):
    name = "cpu_offload"
    capabilities = frozenset({"host_tier"})

    def __init__(self, engine: AsyncEngine):
        if engine.core.offload is None:
            raise ValueError("OffloadConnector needs an engine started with --kv-offload-cpu-gib > 0")
        self.engine = engine
        self.tier = engine.core.offload
        core, mc = engine.core, engine.core.model_config
        self.block_bytes = KVCache.bytes_per_block(mc.num_layers, core.block_size, mc.num_kv_heads, mc.head_dim,
                                                   core.dtype)  # every rank's heads

    async def load(self, request: BlockLoad, start: int) -> ReadStats:
        started = time.perf_counter()
        n = await self.engine.load_from_host(request.request_id, start)
        return ReadStats(n, n, n * self.block_bytes, time.perf_counter() - started)

    def skip(self, request: BlockLoad) -> None:
        """Nothing is held for a request before it loads."""

    def store(self, request: BlockLoad) -> None:
        self.engine.store_to_host(request.request_id)

    def metadata(self) -> dict[str, float]:
        tier = self.tier
        return {"host_slots": float(tier.pool.num_slots), "host_blocks": float(len(tier.pool)),
                "stored_blocks": float(tier.stored_blocks), "loaded_blocks": float(tier.loaded_blocks)}
