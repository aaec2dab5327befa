"""Request ids: a client's ``X-Request-Id`` is a label; the handle engines see is always fresh and random.

The label (the client's ``X-Request-Id`` when valid, else the handle) names the
request to its client: the response's ``X-Request-Id`` header, its ``id``, the
gateway's logs.  Several requests may carry the same label, as in vLLM.  The
handle is a random 128-bit id (32 hex characters) and the only id an engine
sees (a choice of an ``n > 1`` request runs as ``<handle>-<index>``), so no
client can name, and so abort, another client's request.  Handles are cut from
draws of the OS's randomness (``os.urandom``) of ``HANDLES_PER_DRAW`` handles
each: one system call per draw rather than per request.
"""

from __future__ import annotations

import os
import re
from typing import NamedTuple

from services.gateway.errors import invalid

REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
HANDLES_PER_DRAW = 256
HANDLE_HEX = 32  # 128 bits


class RequestId(NamedTuple):
    label: str  # what the client sees
    handle: str  # what engines see


class RequestIds:
    """The handles of the requests in flight."""

    def __init__(self) -> None:
        self.active: set[str] = set()
        self._random = ""  # the hex digits of the last draw
        self._taken = 0  # how many of them handles used

    def _new_handle(self) -> str:
        """A random 128-bit id: 32 hex characters nobody can predict."""
        if self._taken == len(self._random):
            self._random, self._taken = os.urandom(HANDLE_HEX // 2 * HANDLES_PER_DRAW).hex(), 0
        start, self._taken = self._taken, self._taken + HANDLE_HEX
        return self._random[start:self._taken]

    def __len__(self) -> int:
        return len(self.active)

    def reserve(self, given: str | None) -> RequestId:
        """The request's ids (label ``given``, the header's value, or the handle), its handle in flight from
        now on; raises 400 for a malformed label."""
        if given is not None and not REQUEST_ID.fullmatch(given):
            raise invalid("X-Request-Id must be 1-128 characters of A-Z a-z 0-9 . _ : -", "X-Request-Id")
        handle = self._new_handle()
        self.active.add(handle)
        return RequestId(handle if given is None else given, handle)

    def release(self, handle: str) -> None:
        self.active.discard(handle)
