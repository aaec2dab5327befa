"""Typed errors: one class per way a cross-process call can fail."""

from __future__ import annotations


class PdserveError(Exception):
    """Base of every pdserve error."""


class StartupError(PdserveError):
    """An expected reason a service cannot start (e.g. a model that cannot be loaded); ``str()`` says
    what to change, and the service exits with status 2 printing only that."""


class BusError(PdserveError):
    """A bus call did not produce the reply it asked for."""


class CallTimeout(BusError):
    """No (further) reply within the call's timeout."""


class PeerGone(BusError):
    """The peer disconnected or restarted while the call was pending."""


class PeerError(BusError):
    """The peer answered with an ``ErrorReply``."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.param = param


class KVTransferError(PdserveError):
    """Reading a request's KV blocks from a remote engine failed."""


class KVBlocksRefused(KVTransferError):
    """A transfer's params name other blocks than its prefill's lease holds: nothing of it may be used."""


class HandshakeError(KVTransferError):
    """The handshake with a remote engine failed, timed out or was refused."""
