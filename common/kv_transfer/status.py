"""Transfer statuses and their aggregation per request.

A request's KV read is made of many transfers (one per merged range), reported by
every decode rank of a tensor-parallel instance (each reads the heads it owns).
The request is done only when every rank has reported and every status of every
transfer succeeded; one failure anywhere fails it; anything missing or still
running keeps it pending.
(ATOM looked only at the last status of a list, so an earlier failure or a
still-running read went unseen.)
"""

from __future__ import annotations

import enum
from collections.abc import Iterable


class TransferStatus(enum.Enum):
    PENDING = "pending"
    SUCCESS = "success"
    FAILED = "failed"


def aggregate(statuses: Iterable[TransferStatus]) -> TransferStatus:
    """FAILED if any failed, else PENDING if any pending, else SUCCESS (also for none)."""
    pending = False
    for status in statuses:
        if status is TransferStatus.FAILED:
            return TransferStatus.FAILED
        if status is TransferStatus.PENDING:
            pending = True
    return TransferStatus.PENDING if pending else TransferStatus.SUCCESS


class TransferQuorum:
    """One request's read across ``world_size`` decode ranks: done only when every rank reported
    and every status of every report succeeded.

    A failure is final: once any rank reported a failed status the quorum stays FAILED (until
    ``reset``), whatever that rank or the others report later.  A rank that reports again
    replaces its statuses but never counts twice, so duplicates cannot complete the quorum early
    (ATOM's ``KVOutputAggregator`` could).  A rank outside ``range(world_size)`` is a ``ValueError``.
    """

    def __init__(self, world_size: int = 1):
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self._reports: dict[int, list[TransferStatus]] = {}
        self._failed = False

    def report(self, rank: int, statuses: Iterable[TransferStatus]) -> TransferStatus:
        """Record ``rank``'s statuses; returns the request's state afterwards."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} not in [0, {self.world_size})")
        report = list(statuses)
        self._reports[rank] = report
        self._failed = self._failed or aggregate(report) is TransferStatus.FAILED
        return self.state

    def reset(self) -> None:
        """Forget every report (and a failure): the quorum is pending again."""
        self._reports.clear()
        self._failed = False

    @property
    def state(self) -> TransferStatus:
        if self._failed:
            return TransferStatus.FAILED
        if len(self._reports) < self.world_size:
            return TransferStatus.PENDING
        return aggregate(s for statuses in self._reports.values() for s in statuses)
