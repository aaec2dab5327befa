"""``PDConnector``: the P/D transfer's decode side (``KVReader``) as a ``KVConnector``.

Prefill computed every prompt block, so a request with ``params`` has all of
them from any ``start`` on; reading (or skipping) always sends prefill its
``ReleaseKV``.  Decode keeps nothing for prefill, so ``store`` only counts.
"""

from __future__ import annotations

from common.kv_offload.connector import BlockLoad, KVConnector
from common.kv_transfer.reader import KVReader, ReadStats


class PDConnector(KVConnector):
    name = "pd"
    capabilities = frozenset({"remote_prefill", "heterogeneous_block_size"})

    def __init__(self, reader: KVReader):
        self.reader = reader
        self.counts = {"read_blocks": 0.0, "read_bytes": 0.0, "skipped": 0.0, "stores": 0.0}

    async def load(self, request: BlockLoad, start: int) -> ReadStats:
        if request.params is None:
            return ReadStats(0, 0, 0, 0.0)
        stats = await self.reader.read_blocks(request.params, request.block_ids, start)
        self.counts["read_blocks"] += stats.num_blocks
        self.counts["read_bytes"] += stats.bytes
        return stats

    def skip(self, request: BlockLoad) -> None:
        if request.params is not None:
            self.counts["skipped"] += 1
            self.reader.release(request.params)

    def store(self, request: BlockLoad) -> None:
        self.counts["stores"] += 1

    def metadata(self) -> dict[str, float]:
        return dict(self.counts)
