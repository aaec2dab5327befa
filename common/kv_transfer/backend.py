"""The one interface every KV transfer backend implements.

Life cycle: build -> ``register`` all KV memory ONCE (before any peer connects:
peers may cache our memory map on first contact) -> publish ``session`` and
``backend_meta()`` in the handshake -> peers ``connect`` and ``read`` -> ``close``
(unregister, then destroy).  ``read`` is synchronous and may busy-poll a core:
callers on an event loop run it in a small thread pool.

``make_backend`` builds one by name; the implementations are imported only then, so this
module imports none of them (they import it).
"""

from __future__ import annotations

import abc
import importlib

from common.kv_transfer.status import TransferStatus
from common.messages import MemoryRegion


class BackendUnavailable(RuntimeError):
    """The backend's library cannot be loaded; the message names the fix."""


class TransferBackend(abc.ABC):
    name: str

    @classmethod
    @abc.abstractmethod
    def build(cls, host: str, *, force_tcp: bool, device_id: int, read_timeout_s: float) -> TransferBackend:
        """The backend advertised at ``host`` from the options ``make_backend`` passes to every backend
        (each uses those that concern it); ``BackendUnavailable`` when its library cannot be loaded."""

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


BACKENDS = {  # name -> "module:class", imported only when that backend is built
    "mooncake": "common.kv_transfer.mooncake:MooncakeBackend",
    "mori": "common.kv_transfer.mori:MoriBackend",
}


def make_backend(
    name: str, host: str, *, force_tcp: bool = False, device_id: int = -1, read_timeout_s: int = 30
) -> TransferBackend:
    """Build the backend ``name`` (a key of ``BACKENDS``) advertised at ``host``.

    ``device_id`` < 0 means KV memory is host memory; a read fails after ``read_timeout_s``.  Raises
    ``BackendUnavailable`` when the library cannot be loaded, ``ValueError`` for an unknown name.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown KV transfer backend {name!r} (known: {', '.join(sorted(BACKENDS))})")
    module_name, class_name = BACKENDS[name].split(":")
    backend_class = getattr(importlib.import_module(module_name), class_name)
    return backend_class.build(host, force_tcp=force_tcp, device_id=device_id, read_timeout_s=read_timeout_s)
