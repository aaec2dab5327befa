"""HTTP-facing errors with the OpenAI error body."""

from __future__ import annotations

from common.errors import PdserveError

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "bad_gateway_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class APIError(PdserveError):
    """A request failed: ``status`` is the HTTP status, ``body()`` the OpenAI error object;
    ``retry_after`` (seconds), when set, goes out as the ``Retry-After`` header."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    """A 400 for bad input."""
    return APIError(400, message, param=param, code=code)


def no_instance(message: str) -> APIError:
    """The 503 for work no registered instance can take now (``message`` says which)."""
    return APIError(503, message, code="no_instance")
