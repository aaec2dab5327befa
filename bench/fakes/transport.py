"""A fake KV transport: a ``TransferBackend`` that moves nothing.

It lets the real side channel answer handshakes for a fake prefill engine, and
a real ``KVReader`` "read" from it: ``read`` sleeps ``read_delay_s`` and reports
every range a success.
"""

from __future__ import annotations

import time

import torch

from common.kv_transfer.backend import TransferBackend, check_batch
from common.kv_transfer.config import KVTransferConfig
from common.kv_transfer.rank_io import LocalRankIO, rank_memory
from common.kv_transfer.ranges import KVLayout
from common.kv_transfer.status import TransferStatus
from common.kv_transfer.transport_set import TransportSet
from common.kv_transfer.transports import Placement
from common.messages import MemoryRegion


class FakeTransport(TransferBackend):
    """Registers, connects, reads and writes in name only; each takes ``read_delay_s``."""

    name = "fake"

    def __init__(self, session: str, read_delay_s: float = 0.0):
        self._session = session
        self.read_delay_s = read_delay_s
        self.regions: list[MemoryRegion] = []
        self.peers: set[str] = set()

    @classmethod
    def build(cls, host: str, kv: torch.Tensor, *, transport: str, read_timeout_s: float) -> FakeTransport:
        return cls(f"fake://{host}")

    @classmethod
    def serving(cls, session: str, layout: KVLayout, num_kv_heads: int, read_delay_s: float = 0.0) -> LocalRankIO:
        """A TP 1 engine's one rank as the side channel and the reader see it: this fake as ``tcp``,
        the KV (``num_kv_heads`` heads in ``layout``) in host memory of a fake host, registered."""
        transport = cls(session, read_delay_s)
        transport.register([layout.region])
        transports = TransportSet("tcp", Placement("fake-host", "cpu"), {"tcp": transport})
        memory = rank_memory(0, (0, num_kv_heads), transports, layout)
        return LocalRankIO(memory, transports, KVTransferConfig(kv_transport="tcp"))

    def register(self, regions: list[MemoryRegion]) -> None:
        self.regions = list(regions)

    @property
    def session(self) -> str:
        return self._session

    def backend_meta(self) -> bytes:
        return b""

    def connect(self, peer_session: str, peer_meta: bytes) -> None:
        self.peers.add(peer_session)

    def transfer(self, peer_session: str, local_addrs: list[int], remote_addrs: list[int], lengths: list[int],
                 *, write: bool) -> list[TransferStatus]:
        check_batch(local_addrs, remote_addrs, lengths)
        if self.read_delay_s > 0:
            time.sleep(self.read_delay_s)
        return [TransferStatus.SUCCESS] * len(lengths)

    def close(self) -> None:
        self.regions = []
        self.peers.clear()
