"""The KV transports one engine serves: their backends, opened and registered at start, closed at shutdown.

``shared_kv_file`` decides, before the engine allocates its KV cache, whether
the cache goes into a shared-memory file (host memory the ``shm`` transport
serves); ``TransportSet.open`` then opens the backends ``transports.plan``
names, registers the KV memory with each (before any peer can learn our
address) and owns them until ``close``.
"""

from __future__ import annotations

import logging
import uuid

import torch

from common.hosts import is_loopback
from common.kv_transfer.backend import BackendUnavailable, TransferBackend, make_backend
from common.kv_transfer.config import KVTransferConfig
from common.kv_transfer.shm import SharedKVFile
from common.kv_transfer.transports import (
    Placement,
    TransportError,
    TransportPlan,
    plan,
    rdma_devices,
    this_host_id,
)
from common.messages import MemoryRegion, TransportOffer

logger = logging.getLogger(__name__)


def plan_for(config: KVTransferConfig, device: torch.device) -> tuple[str, TransportPlan]:
    """The memory kind of KV on ``device`` and the transports an engine with it serves here."""
    memory = "cuda" if device.type == "cuda" else "cpu"
    return memory, plan(config.kv_transport, memory, bool(rdma_devices()), is_loopback(config.kv_host))


def shared_kv_file(config: KVTransferConfig, device: torch.device) -> SharedKVFile | None:
    """Where a KV cache the shm transport will serve is allocated; None when shm is not planned.

    With ``--kv-transport shm`` a cache that does not fit in ``/dev/shm`` fails the start; with ``auto``
    it falls back to private memory (and is served over the network transport).
    """
    if plan_for(config, device)[1].same_host != "shm":
        return None
    return SharedKVFile(fallback=config.kv_transport == "auto")


def _open_backend(name: str, config: KVTransferConfig, kv: torch.Tensor, region: MemoryRegion,
                  transport: str) -> TransferBackend:
    """Backend ``name`` serving ``transport`` with ``region`` registered (closed again if that fails)."""
    backend = make_backend(name, config.kv_host, kv, transport=transport, read_timeout_s=config.kv_read_timeout_s)
    try:
        backend.register([region])
    except BaseException:
        backend.close()
        raise
    return backend


class TransportSet:
    """Transport name -> its backend, for one engine's KV cache; ``placement`` says where the KV lives."""

    def __init__(self, kv_transport: str, placement: Placement, backends: dict[str, TransferBackend]):
        self.kv_transport = kv_transport
        self.placement = placement
        self.backends = backends
        self.incarnation = uuid.uuid4().hex  # this process's KV memory, in handshakes and transfer params
        self.chosen: dict[str, str] = {}  # peer engine id -> the transport a reader chose for it

    @classmethod
    def open(cls, config: KVTransferConfig, kv: torch.Tensor, region: MemoryRegion) -> TransportSet:
        """Open and register every planned transport; ``TransportError`` when a forced one cannot work."""
        memory, planned = plan_for(config, kv.device)
        forced = config.kv_transport != "auto"
        backends: dict[str, TransferBackend] = {}
        try:
            for transport in planned.names:
                backend_name = transport if transport == planned.same_host else config.kv_backend
                try:
                    backend = _open_backend(backend_name, config, kv, region, transport)
                except BackendUnavailable as e:
                    if forced or (transport != planned.same_host and not backends):
                        raise TransportError(f"KV transport {transport}: {e}") from e
                    logger.warning("KV transport %s unavailable, serving without it: %s", transport, e)
                    continue
                backends[transport] = backend
            if not backends and planned.fallback is not None:
                logger.warning("KV transport %s unavailable; serving %s instead, whose listener binds every "
                               "interface (Mooncake has no bind address)", planned.same_host, planned.fallback)
                backends[planned.fallback] = _open_backend(config.kv_backend, config, kv, region, planned.fallback)
        except BaseException:
            for backend in backends.values():
                backend.close()
            raise
        logger.info("KV transports served: %s (%s memory)", ", ".join(backends), memory)
        return cls(config.kv_transport, Placement(this_host_id(), memory), backends)

    def offers(self) -> list[TransportOffer]:
        return [TransportOffer(name, b.name, b.session, b.backend_meta()) for name, b in self.backends.items()]

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()
        self.backends = {}
