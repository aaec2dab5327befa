"""``MultiConnector``: several ``KVConnector``s behind one, with vLLM's MultiConnector semantics.

- load: each block comes from the first connector (in order) that has it, and is
  never loaded twice: every connector continues where the ones before it
  stopped, and one that is not reached (the blocks are all filled, or an
  earlier one failed) is told to ``skip`` the request.  (vLLM gives a request's
  whole load to its first connector with a match; continuing the chain lets a
  decode engine take its host-tier prefix and read only the rest from prefill.)
- store: to every connector.
- metadata: every connector's, in one dict keyed ``"<connector>.<counter>"``.
- a capability is supported when any connector supports it.
"""

from __future__ import annotations

from common.kv_offload.connector import BlockLoad, KVConnector
from common.kv_transfer.reader import ReadStats


class MultiConnector(KVConnector):
    name = "multi"

    def __init__(self, connectors: list[KVConnector]):
        if not connectors:
            raise ValueError("MultiConnector needs at least one connector")
        self.connectors = connectors
        self.capabilities = frozenset().union(*(c.capabilities for c in connectors))

    async def load(self, request: BlockLoad, start: int) -> ReadStats:
        parts = (await self.load_each(request, start)).values()
        return ReadStats(sum(p.num_blocks for p in parts), sum(p.num_ranges for p in parts),
                         sum(p.bytes for p in parts), sum(p.seconds for p in parts))

    async def load_each(self, request: BlockLoad, start: int) -> dict[str, ReadStats]:
        """``load``, reporting each connector that was asked (by name, in order) on its own."""
        at, parts, asked = start, {}, 0
        try:
            for connector in self.connectors:
                if at == len(request.block_ids):
                    break
                asked += 1  # a connector that fails frees its own source's hold
                stats = parts[connector.name] = await connector.load(request, at)
                at += stats.num_blocks
        finally:
            for connector in self.connectors[asked:]:
                connector.skip(request)
        return parts

    def skip(self, request: BlockLoad) -> None:
        for connector in self.connectors:
            connector.skip(request)

    def store(self, request: BlockLoad) -> None:
        for connector in self.connectors:
            connector.store(request)

    def metadata(self) -> dict[str, float]:
        return {f"{c.name}.{key}": value for c in self.connectors for key, value in c.metadata().items()}
