"""The one interface every KV transfer backend implements.

Life cycle: build -> ``register`` all KV memory ONCE (before any peer connects:
peers may cache our memory map on first contact) -> publish ``session`` and
``backend_meta()`` in the handshake -> peers ``connect`` and ``read`` (read mode: decode pulls from
prefill) or ``write`` (push mode: prefill writes into decode's blocks) -> ``close``
(unregister, then destroy).  ``read`` and ``write`` are synchronous and may busy-poll a core:
callers on an event loop run them in a small thread pool, but for up to ``inline_bytes``.

``make_backend`` builds one by name; the implementations are imported only then, so this
module imports none of them (they import it).  The network backends (``mooncake``,
``mori``) serve the ``rdma`` and ``tcp`` transports; ``shm`` and ``nvlink`` serve
engines on one host (see ``transports.py``).
"""

from __future__ import annotations

import abc
import importlib
from typing import TYPE_CHECKING

from common.kv_transfer.status import TransferStatus
from common.messages import MemoryRegion

if TYPE_CHECKING:
    import torch

    from common.kv_transfer.ranges import BlockPairs


class BackendUnavailable(RuntimeError):
    """The backend's library cannot be loaded; the message names the fix."""


class TransferBackend(abc.ABC):
    name: str
    read_shards: int = 1  # concurrent reads one request is best split into (busy-polling backends: 1)
    # A read (or write) of at most this many bytes runs on the caller's thread, not the pool: for a backend whose
    # copy of that much takes about as long as a thread hand-off and its wake-up back (68 us on an H200 host).
    inline_bytes: int = 0

    @classmethod
    @abc.abstractmethod
    def build(cls, host: str, kv: torch.Tensor, *, transport: str, read_timeout_s: float) -> TransferBackend:
        """The backend advertised at ``host`` for the KV cache tensor ``kv``, serving ``transport``
        (each uses the options that concern it); ``BackendUnavailable`` when it cannot work here."""

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

    def read(self, peer_session: str, local_addrs: list[int], remote_addrs: list[int], lengths: list[int]
             ) -> list[TransferStatus]:
        """Copy each remote range into the local range; blocks until all finish.

        Returns one final status (SUCCESS or FAILED) per range; never raises for
        a failed transfer.  ``ValueError`` for malformed arguments.
        """
        return self.transfer(peer_session, local_addrs, remote_addrs, lengths, write=False)

    def write(self, peer_session: str, local_addrs: list[int], remote_addrs: list[int], lengths: list[int]
              ) -> list[TransferStatus]:
        """Push mode, the mirror of ``read``: copy each local range into the peer's remote range (``connect``
        first), with the same statuses; a range outside what either side registered is never touched."""
        return self.transfer(peer_session, local_addrs, remote_addrs, lengths, write=True)

    @abc.abstractmethod
    def transfer(self, peer_session: str, local_addrs: list[int], remote_addrs: list[int], lengths: list[int],
                 *, write: bool) -> list[TransferStatus]:
        """``read`` (``write`` False) or ``write`` (True): what each backend implements."""

    def copy_blocks(self, peer_session: str, blocks: BlockPairs, *, write: bool) -> list[TransferStatus]:
        """``transfer`` of whole blocks (``blocks.local_base`` is in our memory, ``remote_base`` in the peer's),
        one status per block.  Here: their merged byte ranges, a block counting as its range did; a backend that
        copies block tables itself overrides it."""
        ranges, blocks_per_range = blocks.byte_ranges()
        return blocks.block_statuses(self.transfer(peer_session, *ranges, write=write), blocks_per_range)

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
    "shm": "common.kv_transfer.shm:ShmBackend",
    "nvlink": "common.kv_transfer.cuda_ipc:CudaIpcBackend",
}


def make_backend(name: str, host: str, kv: torch.Tensor, *, transport: str, read_timeout_s: float = 30
                 ) -> TransferBackend:
    """Build the backend ``name`` (a key of ``BACKENDS``) advertised at ``host`` for the KV tensor ``kv``.

    ``transport`` is what it serves (``rdma``/``tcp`` for the network backends); a read fails after
    ``read_timeout_s``.  Raises ``BackendUnavailable`` when it cannot work here, ``ValueError`` for
    an unknown name.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown KV transfer backend {name!r} (known: {', '.join(sorted(BACKENDS))})")
    module_name, class_name = BACKENDS[name].split(":")
    backend_class = getattr(importlib.import_module(module_name), class_name)
    return backend_class.build(host, kv, transport=transport, read_timeout_s=read_timeout_s)
