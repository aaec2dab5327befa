"""Request ids: a client's ``X-Request-Id`` is a label; the handle engines see is always fresh and random.

The label (the client's ``X-Request-Id`` when valid, else the handle) names the
request to its client: the response's ``X-Request-Id`` header, its ``id``, the
gateway's logs.  Several requests may carry the same label, as in vLLM.  The
handle is a random 128-bit id (32 hex characters) and the only id an engine
sees (a choice of an ``n > 1`` request runs as ``<handle>-<index>``), so no
client can name, and so abort, another client's request.
"""

from __future__ import annotations

import re
import secrets
from typing import NamedTuple

from services.gateway.errors import invalid

REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


class RequestId(NamedTuple):
    label: str  # what the client sees
    handle: str  # what engines see


def new_handle() -> str:
    """A random 128-bit id: 32 hex characters nobody can predict."""
    return secrets.token_hex(16)


class RequestIds:
    """The handles of the requests in flight."""

    def __init__(self) -> None:
        self.active: set[str] = set()

    def __len__(self) -> int:
        return len(self.active)

    def reserve(self, given: str | None) -> RequestId:
        """The request's ids (label ``given``, the header's value, or the handle), its handle in flight from
        now on; raises 400 for a malformed label."""
        if given is not None and not REQUEST_ID.fullmatch(given):
            raise invalid("X-Request-Id must be 1-128 characters of A-Z a-z 0-9 . _ : -", "X-Request-Id")
        handle = new_handle()
        self.active.add(handle)
        return RequestId(handle if given is None else given, handle)

    def release(self, handle: str) -> None:
        self.active.discard(handle)
