"""Prefill side: how long each pinned transfer may wait for its reader.

A lease starts when a prefill request finishes with ``remote_decode``; the
decode side renews it while it reads.  A lease neither renewed nor released
(decode crashed, the gateway gave up) falls due, and ``expired()`` hands it to
the caller to release.  The table is pure state: it frees nothing itself and
reads time only through the injected clock.  Expiry times are unix seconds
because they travel in ``KVTransferParams``.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class LeaseTable:
    """transfer id -> expiry (unix seconds)."""

    def __init__(self, lease_seconds: float, clock: Callable[[], float] = time.time):
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be > 0, got {lease_seconds}")
        self.lease_seconds = lease_seconds
        self._clock = clock
        self._expiry: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, transfer_id: str) -> bool:
        return transfer_id in self._expiry

    def start(self, transfer_id: str) -> float:
        """Start a lease; returns its expiry.  Starting a live id again is a ``ValueError``."""
        if transfer_id in self._expiry:
            raise ValueError(f"transfer {transfer_id!r} already has a lease")
        expiry = self._clock() + self.lease_seconds
        self._expiry[transfer_id] = expiry
        return expiry

    def renew(self, transfer_ids: list[str]) -> dict[str, float]:
        """Push the expiry of the known ids; unknown (ended) ids are absent from the result."""
        expiry = self._clock() + self.lease_seconds
        renewed = {tid: expiry for tid in transfer_ids if tid in self._expiry}
        self._expiry.update(renewed)
        return renewed

    def end(self, transfer_id: str) -> bool:
        """Forget a lease; False when the id is unknown."""
        return self._expiry.pop(transfer_id, None) is not None

    def expired(self) -> list[str]:
        """End every lease past its expiry; returns their ids (the caller releases their blocks)."""
        now = self._clock()
        due = [tid for tid, expiry in self._expiry.items() if expiry <= now]
        for tid in due:
            del self._expiry[tid]
        return due
