"""Prefill side: blocks pinned for a decode engine, each under a lease that expires.

``pin`` is called when a request finishes with ``remote_decode``; the decode
side renews the lease while it reads and releases it when done.  A lease that
is neither renewed nor released (decode crashed, proxy gave up) expires and the
blocks go back to the engine through the ``release`` callback, exactly once.
Expiry times are unix seconds because they travel in ``KVTransferParams``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Lease:
    block_ids: list[int]
    expiry: float


class LeaseTable:
    """transfer id -> pinned blocks with an expiry; ``release(transfer_id)`` frees them in the engine."""

    def __init__(
        self,
        lease_seconds: float,
        release: Callable[[str], None],
        clock: Callable[[], float] = time.time,
    ):
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be > 0, got {lease_seconds}")
        self.lease_seconds = lease_seconds
        self._release = release
        self._clock = clock
        self._leases: dict[str, Lease] = {}
        self.num_released = 0
        self.num_expired = 0

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, transfer_id: str) -> bool:
        return transfer_id in self._leases

    @property
    def num_blocks_pinned(self) -> int:
        return sum(len(lease.block_ids) for lease in self._leases.values())

    def pin(self, transfer_id: str, block_ids: list[int]) -> float:
        """Start a lease; returns its expiry.  Pinning a live id again is a ``ValueError``."""
        if transfer_id in self._leases:
            raise ValueError(f"transfer {transfer_id!r} is already pinned")
        expiry = self._clock() + self.lease_seconds
        self._leases[transfer_id] = Lease(list(block_ids), expiry)
        return expiry

    def renew(self, transfer_ids: list[str]) -> dict[str, float]:
        """Push the expiry of the known ids; unknown (released/expired) ids are absent from the result."""
        expiry = self._clock() + self.lease_seconds
        renewed = {}
        for tid in transfer_ids:
            lease = self._leases.get(tid)
            if lease is not None:
                lease.expiry = expiry
                renewed[tid] = expiry
        return renewed

    def release(self, transfer_id: str) -> bool:
        """Unpin now; False when the id is unknown or already released (idempotent)."""
        if self._leases.pop(transfer_id, None) is None:
            return False
        self.num_released += 1
        self._release(transfer_id)
        return True

    def expire(self) -> list[str]:
        """Release every lease past its expiry; returns their ids."""
        now = self._clock()
        expired = [tid for tid, lease in self._leases.items() if lease.expiry <= now]
        for tid in expired:
            del self._leases[tid]
            self.num_expired += 1
            logger.warning("KV lease %s expired unread; releasing its blocks", tid)
            self._release(tid)
        return expired

    async def run_sweeper(self, interval_s: float) -> None:
        """Call ``expire()`` every ``interval_s`` until cancelled; a failing release is logged, not fatal."""
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.expire()
            except Exception:
                logger.exception("KV lease sweep failed")
