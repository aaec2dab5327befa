"""API key check: ``Authorization: Bearer <key>`` when the gateway has a key."""

from __future__ import annotations

import hmac

from services.gateway.errors import APIError
from services.gateway.responses import JSONResponse, error_response


def unauthorized(api_key: str | None, authorization: str | None) -> JSONResponse | None:
    """None when no ``api_key`` is set or ``authorization`` (the header's value) bears it, else the 401."""
    if api_key is None:
        return None
    given = authorization or ""
    if given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), api_key.encode()):
        return None
    return error_response(APIError(401, "missing or invalid API key (Authorization: Bearer <key>)",
                                   code="invalid_api_key"))
