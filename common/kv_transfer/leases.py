"""Prefill side: how long each pinned transfer may wait for its reader.

A lease starts when a prefill request finishes with ``remote_decode``; the
decode side renews it while it reads.  A lease neither renewed nor released
(decode crashed, the gateway gave up) falls due, and ``expired()`` hands it to
the caller to release.  Renewals never push a lease past ``max_seconds`` after
its start, so even its rightful reader cannot pin blocks forever.  The table is
pure state: it frees nothing itself and reads time only through the injected
clock.  Expiry times are unix seconds because they travel in ``KVTransferParams``.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class LeaseTable:
    """transfer id -> expiry (unix seconds), each capped at its start + ``max_seconds``."""

    def __init__(self, lease_seconds: float, clock: Callable[[], float] = time.time,
                 max_seconds: float | None = None):
        """``max_seconds`` (None: ten leases) bounds a lease's whole life, renewals included."""
        max_seconds = 10 * lease_seconds if max_seconds is None else max_seconds
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be > 0, got {lease_seconds}")
        if max_seconds < lease_seconds:
            raise ValueError(f"max_seconds must be >= lease_seconds ({lease_seconds}), got {max_seconds}")
        self.lease_seconds = lease_seconds
        self.max_seconds = max_seconds
        self._clock = clock
        self._expiry: dict[str, float] = {}
        self._deadline: dict[str, float] = {}  # transfer id -> the latest expiry any renewal may give it

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, transfer_id: str) -> bool:
        return transfer_id in self._expiry

    def start(self, transfer_id: str) -> float:
        """Start a lease; returns its expiry.  Starting a live id again is a ``ValueError``."""
        if transfer_id in self._expiry:
            raise ValueError(f"transfer {transfer_id!r} already has a lease")
        now = self._clock()
        self._deadline[transfer_id] = now + self.max_seconds
        self._expiry[transfer_id] = expiry = now + self.lease_seconds
        return expiry

    def renew(self, transfer_ids: list[str]) -> dict[str, float]:
        """Push the expiry of the known ids (never past their deadline); unknown (ended) ids are absent."""
        expiry = self._clock() + self.lease_seconds
        renewed = {tid: min(expiry, self._deadline[tid]) for tid in transfer_ids if tid in self._expiry}
        self._expiry.update(renewed)
        return renewed

    def end(self, transfer_id: str) -> bool:
        """Forget a lease; False when the id is unknown."""
        self._deadline.pop(transfer_id, None)
        return self._expiry.pop(transfer_id, None) is not None

    def expired(self) -> list[str]:
        """End every lease past its expiry; returns their ids (the caller releases their blocks)."""
        now = self._clock()
        due = [tid for tid, expiry in self._expiry.items() if expiry <= now]
        for tid in due:
            self.end(tid)
        return due
