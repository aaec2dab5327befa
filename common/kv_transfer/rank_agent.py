"""A worker rank's KV transfer agent: its memory registered, its reads run on rank 0's orders.

In a P/D instance of TP size N every rank holds the KV heads of its shard in its
own KV cache.  A worker rank (``common.engine.tp_workers``) opens its own
transports on that cache (``open_rank_agent``: the memory is registered before
anyone can learn about it), then serves rank 0 from a ``RankAgent``: a bus
server on a thread and event loop of its own (the worker's main thread runs the
model), answering ``RankConnect`` and ``RankRead`` with a ``LocalRankIO``.

The agent's ``RankAgentInfo`` (how peers see its memory, and where rank 0 reaches
the agent) is published in the instance's rendezvous store; rank 0 puts every
rank's memory in its handshake replies and drives every read (``rank_io.RemoteRankIO``).
Prefill workers never get orders: decode ranks read their memory one-sidedly.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import msgspec
import torch

from common.bus import BusServer
from common.bus.curve import KV_ADMITS
from common.errors import PeerError
from common.kv_transfer.config import KVTransferConfig
from common.kv_transfer.rank_io import LocalRankIO
from common.kv_transfer.ranges import ByteRanges, KVLayout
from common.kv_transfer.status import TransferStatus
from common.messages import Ack, KVRankMemory, RankConnect, RankRead, RankReadDone, RankRequest

logger = logging.getLogger(__name__)

AGENT_START_TIMEOUT_S = 30.0  # binding a local socket: anything longer is a broken host


class RankAgentInfo(msgspec.Struct, frozen=True):
    """What rank 0 learns about a worker rank: its KV memory and its agent's endpoint."""

    memory: KVRankMemory
    endpoint: str


class RankAgent:
    """Serves rank 0's orders for one worker rank on its own thread until ``close``."""

    def __init__(self, io: LocalRankIO):
        self.io = io
        self.endpoint = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"kv-agent-{io.memory.rank}", daemon=True)

    def start(self) -> str:
        """Start serving; returns the endpoint rank 0 calls (on 127.0.0.1: ranks share a host)."""
        self._thread.start()
        if not self._ready.wait(AGENT_START_TIMEOUT_S) or self._failure is not None:
            self.io.close()
            raise RuntimeError(f"the KV agent of rank {self.io.memory.rank} did not start: {self._failure!r}")
        return self.endpoint

    def close(self) -> None:
        """Stop serving (a read in progress finishes first), then the read threads and the transports."""
        if self._loop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join()
        self.io.close()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # noqa: BLE001 - reported to start(), or logged once serving
            self._failure = e
            self._ready.set()
            logger.exception("KV agent of rank %d failed", self.io.memory.rank)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = BusServer("tcp://127.0.0.1:0", RankRequest, name=f"kv-agent-{self.io.memory.rank}",
                           admits=KV_ADMITS)
        server.on(RankConnect, self.on_connect)
        server.on(RankRead, self.on_read)
        await server.start()
        self.endpoint = server.endpoint
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await server.close()

    async def on_connect(self, msg: RankConnect) -> Ack:
        if msg.transport not in self.io.transports.backends:
            raise PeerError("invalid_request", f"rank {self.io.memory.rank} serves no {msg.transport} transport")
        try:
            await self.io.connect(msg.transport, msg.session, msg.meta)
        except Exception as e:  # whatever the backend raises, rank 0 gets a typed error
            raise PeerError("kv_transfer_failed", f"rank {self.io.memory.rank}: {msg.transport} cannot connect "
                            f"to {msg.session}: {e}") from e
        return Ack()

    async def on_read(self, msg: RankRead) -> RankReadDone:
        if msg.transport not in self.io.transports.backends:
            raise PeerError("invalid_request", f"rank {self.io.memory.rank} serves no {msg.transport} transport")
        if not len(msg.local_addrs) == len(msg.remote_addrs) == len(msg.lengths):
            raise PeerError("invalid_request", "RankRead: the address and length lists differ in length")
        ranges = ByteRanges(msg.local_addrs, msg.remote_addrs, msg.lengths)
        copy = self.io.write if msg.write else self.io.read
        statuses, seconds = await copy(msg.transport, msg.session, ranges)
        return RankReadDone([i for i, s in enumerate(statuses) if s is not TransferStatus.SUCCESS], seconds)


def open_rank_agent(config: KVTransferConfig, rank: int, heads: tuple[int, int], kv: torch.Tensor, layout: KVLayout,
                    tp_size: int) -> tuple[RankAgent, RankAgentInfo]:
    """Register rank ``rank`` of ``tp_size``'s KV (``kv``, laid out as ``layout``, holding KV heads ``heads``)
    with its transports and start its agent (whose ``close`` closes them)."""
    agent = RankAgent(LocalRankIO.open(config, rank, heads, kv, layout, tp_size))
    return agent, RankAgentInfo(agent.io.memory, agent.start())
