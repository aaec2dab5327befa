"""The request body, read whole within the configured size limit."""

from __future__ import annotations

import asyncio

from starlette.types import Receive

from services.gateway.errors import APIError
from services.gateway.connection_hook import ClientGone

# How long the rest of an oversized body is read and dropped before its 413 goes out.  A server that
# answers and closes while its client is still sending resets the connection, and a client that sends
# its whole body before reading (most do) then gets the reset and never the answer.
DISCARD_S = 5.0


def too_large(limit: int) -> APIError:
    return APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")


async def read_body(headers: dict[bytes, bytes], receive: Receive, limit: int) -> bytes:
    """The whole request body; raises 413 past ``limit`` bytes (once the rest of the body is read and
    dropped, for up to ``DISCARD_S``), ``ClientGone`` on a disconnect."""
    length = headers.get(b"content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        await _discard_rest(receive)
        raise too_large(limit)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        size += len(chunk)
        if size > limit:
            if more:
                await _discard_rest(receive)
            raise too_large(limit)
        chunks.append(chunk)
        if not more:
            return b"".join(chunks)


async def _discard_rest(receive: Receive) -> None:
    """Read what is left of the body and drop it, until it ends, the client goes away, or ``DISCARD_S``."""
    try:
        async with asyncio.timeout(DISCARD_S):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect" or not message.get("more_body", False):
                    return
    except TimeoutError:
        return
