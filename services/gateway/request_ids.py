"""Request ids: the client's ``X-Request-Id`` when valid, else a fresh one, reserved while in flight."""

from __future__ import annotations

import itertools
import os
import re
from contextlib import contextmanager
from typing import Iterator

from services.gateway.errors import invalid

REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


class RequestIds:
    """The ids of the requests in flight; a fresh id is this process's random prefix, then a counter."""

    def __init__(self) -> None:
        self.active: set[str] = set()
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)

    def __len__(self) -> int:
        return len(self.active)

    def fresh(self) -> str:
        """An id unique to this gateway process."""
        return f"{self._prefix}{next(self._counter):016x}"

    def reserve(self, given: str | None) -> str:
        """The request's id (``given``, the header's value, or a fresh one), reserved at once, so two
        requests sending the same id concurrently cannot both run (and abort each other's legs);
        raises 400 for a malformed or duplicate id."""
        if given is None:
            given = self.fresh()
        elif not REQUEST_ID.fullmatch(given):
            raise invalid("X-Request-Id must be 1-128 characters of A-Z a-z 0-9 . _ : -", "X-Request-Id")
        elif given in self.active:
            raise invalid(f"request id {given!r} is already in flight", "X-Request-Id", "duplicate_request_id")
        self.active.add(given)
        return given

    @contextmanager
    def reserved(self, given: str | None) -> Iterator[str]:
        """``reserve(given)`` for the block: released if the block raises (anything, cancellation too);
        once the block ends without raising, the id is the caller's to release (a request run's ``close``)."""
        request_id = self.reserve(given)
        try:
            yield request_id
        except BaseException:
            self.release(request_id)
            raise

    def release(self, request_id: str) -> None:
        self.active.discard(request_id)
