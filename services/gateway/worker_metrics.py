"""``/metrics`` of a gateway run as worker processes: every worker's series, labelled by worker.

Each worker answers on a unix socket in the gateway's directory (``<index>.sock``) with its
per-request families (``GatewayMetrics.snapshot``).  The worker that gets a scrape reads every
other worker's, adds ``worker="<index>"`` to each of their samples and to its own, and appends
its per-instance gauges (every worker watches the same registry, so one worker's are the
gateway's).

The rule for the whole gateway: ``sum without (worker)`` of a series, e.g.
``sum without (worker) (rate(pdserve_gateway_requests_total[1m]))``; a histogram's buckets
sum the same way.  Per-worker series rather than sums taken at scrape time keep each counter
monotonic: a restarted worker's own series starts again from zero, which ``rate()`` reads as
that series' reset, where a summed counter would drop and be read as a reset of the whole
gateway.  They cost nothing per request (Prometheus's multiprocess mode writes a memory-mapped
file on every observation).  A worker that does not answer within the timeout (one being
restarted) is left out of that scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import msgspec
from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric

from services.gateway.metrics import GatewayMetrics

_decode = msgspec.msgpack.Decoder(list[tuple[str, str, str, list[tuple[str, dict[str, str], float]]]]).decode


@dataclass(frozen=True, slots=True)
class WorkerSlot:
    """Which worker a gateway process is: ``index`` of ``workers``, sharing ``directory``."""

    index: int
    workers: int
    directory: str

    def socket_path(self, index: int) -> str:
        return os.path.join(self.directory, f"{index}.sock")


class WorkerMetrics:
    """One worker's side of the exchange: ``start`` answers the others, ``render`` is ``/metrics``."""

    def __init__(self, metrics: GatewayMetrics, slot: WorkerSlot, timeout_s: float):
        self.metrics = metrics
        self.slot = slot
        self.timeout_s = timeout_s
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        path = self.slot.socket_path(self.slot.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by this slot's previous process
        self._server = await asyncio.start_unix_server(self._answer, path=path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(self.metrics.snapshot())
            await writer.drain()
        except ConnectionError:
            pass  # the reader gave up
        finally:
            writer.close()

    async def _read(self, index: int) -> bytes:
        """Worker ``index``'s snapshot; empty when it does not answer in time."""
        if index == self.slot.index:
            return self.metrics.snapshot()
        try:
            async with asyncio.timeout(self.timeout_s):
                reader, writer = await asyncio.open_unix_connection(self.slot.socket_path(index))
                try:
                    return await reader.read()
                finally:
                    writer.close()
        except (OSError, TimeoutError):
            return b""

    async def render(self) -> bytes:
        """The exposition text of the whole gateway."""
        snapshots = await asyncio.gather(*(self._read(i) for i in range(self.slot.workers)))
        merged = _Merged([(i, _decode(s)) for i, s in enumerate(snapshots) if s])
        return generate_latest(merged) + generate_latest(self.metrics.instances_registry)


class _Merged:
    """A collector of the workers' families, each sample labelled with its worker's index."""

    def __init__(self, snapshots: list[tuple[int, list]]):
        self.snapshots = snapshots

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for index, families_of_worker in self.snapshots:
            for name, documentation, kind, samples in families_of_worker:
                family = families.get(name)
                if family is None:
                    family = families[name] = Metric(name, documentation, kind)
                for sample, labels, value in samples:
                    family.add_sample(sample, {**labels, "worker": str(index)}, value)
        return iter(families.values())
