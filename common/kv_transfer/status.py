"""Transfer statuses and their aggregation per request.

A request's KV read is made of many transfers (one per merged range), possibly
reported by several workers (parallel batches).  The request is done only when
every worker has reported and every status of every transfer succeeded; one
failure anywhere fails it; anything missing or still running keeps it pending.
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


class RequestTransfers:
    """Statuses of one request's transfers, reported by ``num_workers`` distinct workers.

    A worker that reports again replaces its earlier report (a duplicate never
    counts twice towards the quorum); a worker index outside ``range(num_workers)``
    is a ``ValueError``.
    """

    def __init__(self, num_workers: int = 1):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self._reports: dict[int, list[TransferStatus]] = {}

    def report(self, worker: int, statuses: Iterable[TransferStatus]) -> TransferStatus:
        """Record ``worker``'s statuses; returns the request's state afterwards."""
        if not 0 <= worker < self.num_workers:
            raise ValueError(f"worker {worker} not in [0, {self.num_workers})")
        self._reports[worker] = list(statuses)
        return self.state

    @property
    def state(self) -> TransferStatus:
        reported = aggregate(s for statuses in self._reports.values() for s in statuses)
        if reported is TransferStatus.FAILED or len(self._reports) == self.num_workers:
            return reported
        return TransferStatus.PENDING
