"""``KVConnector``: where a decode request's prompt KV can come from, behind one interface.

A connector *loads* a leading run of a request's blocks from some ``start`` on
(what it has of them: the host tier a prefix chain, the P/D transfer everything
prefill computed), is told to *skip* a request it will load nothing for (so
its source can let go: prefill's lease), *stores* a request's valid blocks
where it keeps KV (returning at once), and reports *metadata* (counters) and
*capabilities*.  ``MultiConnector`` composes several.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from common.kv_transfer.reader import ReadStats
from common.messages import KVTransferParams


@dataclass(frozen=True)
class BlockLoad:
    """One request's prompt KV to fill: ``block_ids`` are ours, one per block of the prompt;
    ``params`` say where prefill holds it (None: no remote prefill)."""

    request_id: str
    block_ids: list[int]
    params: KVTransferParams | None = None


class KVConnector(ABC):
    name: str
    capabilities: frozenset[str]

    def supports(self, capability: str) -> bool:
        return capability in self.capabilities

    @abstractmethod
    async def load(self, request: BlockLoad, start: int) -> ReadStats:
        """Fill the blocks ``request.block_ids[start:]`` this connector has (a leading run of them);
        ``num_blocks`` of the result says how many (0: none).  Raises ``KVTransferError``."""

    @abstractmethod
    def skip(self, request: BlockLoad) -> None:
        """This request will load nothing from this connector: its source may free what it holds for it."""

    @abstractmethod
    def store(self, request: BlockLoad) -> None:
        """The request's blocks are valid: keep them where this connector keeps KV (returns at once)."""

    @abstractmethod
    def metadata(self) -> dict[str, float]:
        """This connector's counters."""
