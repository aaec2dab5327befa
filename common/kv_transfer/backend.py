"""The one interface every KV transfer backend implements.

Life cycle: build -> ``register`` all KV memory ONCE (before any peer connects:
peers may cache our memory map on first contact) -> publish ``session`` and
``backend_meta()`` in the handshake -> peers ``connect`` and ``read`` -> ``close``
(unregister, then destroy).  ``read`` is synchronous and may busy-poll a core:
callers on an event loop run it in a small thread pool.
"""

from __future__ import annotations

import abc

from common.kv_transfer.status import TransferStatus
from common.messages import MemoryRegion


class BackendUnavailable(RuntimeError):
    """The backend's library cannot be loaded; the message names the fix."""


class TransferBackend(abc.ABC):
    name: str

    @abc.abstractmethod
    def register(self, regions: list[MemoryRegion]) -> None:
        """Register local memory peers may read and we may read into; call once."""

    @property
    @abc.abstractmethod
    def session(self) -> str:
        """The address peers use to reach this backend (e.g. Mooncake ``host:rpc_port``)."""

    @abc.abstractmethod
    def backend_meta(self) -> bytes:
        """Opaque blob a peer passes to ``connect`` (may be empty)."""

    @abc.abstractmethod
    def connect(self, peer_session: str, peer_meta: bytes) -> None:
        """Prepare to read from a peer; idempotent for an already-known peer."""

    @abc.abstractmethod
    def read(
        self,
        peer_session: str,
        local_addrs: list[int],
        remote_addrs: list[int],
        lengths: list[int],
    ) -> list[TransferStatus]:
        """Copy each remote range into the local range; blocks until all finish.

        Returns one final status (SUCCESS or FAILED) per range; never raises for
        a failed transfer.  ``ValueError`` for malformed arguments.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Unregister memory and destroy the engine; idempotent."""


def check_batch(local_addrs: list[int], remote_addrs: list[int], lengths: list[int]) -> None:
    """``ValueError`` unless the three lists have one positive-length entry per range."""
    if not len(local_addrs) == len(remote_addrs) == len(lengths):
        raise ValueError(
            f"batch lists differ in length: {len(local_addrs)} local, "
            f"{len(remote_addrs)} remote, {len(lengths)} lengths"
        )
    if any(n <= 0 for n in lengths):
        raise ValueError("every transfer length must be > 0")


def make_backend(
    name: str, host: str, *, force_tcp: bool = False, device_id: int = -1, read_timeout_s: int = 30
) -> TransferBackend:
    """Build the backend ``name`` ("mooncake" or "mori") advertised at ``host``.

    ``device_id`` < 0 means KV memory is host memory; a read fails after ``read_timeout_s``.  Raises ``BackendUnavailable``
    when the library cannot be loaded, ``ValueError`` for an unknown name.
    """
    if name == "mooncake":
        from common.kv_transfer.mooncake import MooncakeBackend

        return MooncakeBackend(host, force_tcp=force_tcp, transfer_timeout_s=read_timeout_s)
    if name == "mori":
        from common.kv_transfer.mori import MoriBackend

        return MoriBackend(host, force_tcp=force_tcp, device_id=device_id, read_timeout_s=read_timeout_s)
    raise ValueError(f"unknown KV transfer backend {name!r} (expected 'mooncake' or 'mori')")
