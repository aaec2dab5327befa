"""Request handles: random 128-bit ids, cut from few draws of the OS's randomness (issue 16)."""

from __future__ import annotations

import os

from services.gateway import request_ids
from services.gateway.request_ids import HANDLES_PER_DRAW, RequestIds


def test_handles_are_unique_random_hex_from_one_draw_per_many_requests(monkeypatch):
    draws: list[int] = []

    def urandom(n: int) -> bytes:
        draws.append(n)
        return real(n)

    real = os.urandom
    monkeypatch.setattr(request_ids.os, "urandom", urandom)
    ids = RequestIds()
    handles = [ids.reserve(None).handle for _ in range(2 * HANDLES_PER_DRAW + 1)]
    assert len(set(handles)) == len(handles)
    assert all(len(h) == 32 and int(h, 16) >= 0 for h in handles)
    assert len(draws) == 3  # one system call per HANDLES_PER_DRAW handles, not one per request
