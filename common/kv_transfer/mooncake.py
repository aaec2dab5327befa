"""Mooncake Transfer Engine backend.

The ``mooncake`` module comes from one of three builds, one per host kind (pdserve's extras
``cpu``, ``cuda12``, ``cuda13``: see pyproject.toml).  P2PHANDSHAKE metadata (no etcd): each
engine binds an RPC port and peers address it as ``host:rpc_port``.  RDMA when NICs exist, TCP
otherwise or when forced (``MC_FORCE_TCP=1``).  Batch reads are synchronous and busy-poll: run
them off the event loop.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from common.kv_transfer.backend import BackendUnavailable, TransferBackend, check_batch
from common.kv_transfer.status import TransferStatus
from common.kv_transfer.transports import rdma_devices
from common.messages import MemoryRegion

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "install one Mooncake build from the pdserve checkout: pip install -e '.[cpu]' (host without an NVIDIA GPU), "
    "pip install -e '.[cuda12]' or pip install -e '.[cuda13]' (GPU host: torch's CUDA major version), "
    "after pip uninstall of any other mooncake-transfer-engine* build (each ships the mooncake module); "
    "`make install` picks the build for this host; and apt-get install libibverbs1 librdmacm1 libnuma1 libcurl4"
)


def load_transfer_engine_class() -> Any:
    """``mooncake.engine.TransferEngine``, or ``BackendUnavailable`` naming the fix."""
    try:
        from mooncake.engine import TransferEngine
    except (ImportError, OSError) as e:
        raise BackendUnavailable(f"cannot load Mooncake ({e}); fix: {INSTALL_HINT}") from e
    return TransferEngine


class MooncakeBackend(TransferBackend):
    name = "mooncake"

    @classmethod
    def build(cls, host: str, kv: torch.Tensor, *, transport: str, read_timeout_s: float) -> MooncakeBackend:
        """Mooncake registers host and device memory alike; over TCP it stages device memory through
        host memory (said in the log)."""
        if transport == "tcp" and kv.device.type == "cuda":
            logger.warning("KV over TCP: Mooncake copies this engine's GPU KV through host memory")
        return cls(host, force_tcp=transport == "tcp", transfer_timeout_s=int(read_timeout_s))

    def __init__(self, host: str, *, force_tcp: bool = False, transfer_timeout_s: int = 30):
        if not host:
            raise ValueError("Mooncake needs the host address peers reach this engine at")
        if transfer_timeout_s <= 0:
            raise ValueError(f"transfer_timeout_s must be > 0, got {transfer_timeout_s}")
        engine_cls = load_transfer_engine_class()
        self.use_tcp = force_tcp or not rdma_devices()
        if self.use_tcp:
            os.environ["MC_FORCE_TCP"] = "1"
        os.environ["MC_TRANSFER_TIMEOUT"] = str(transfer_timeout_s)
        self.engine = engine_cls()
        protocol = "tcp" if self.use_tcp else "rdma"
        if self.engine.initialize(host, "P2PHANDSHAKE", protocol, "") != 0:
            raise RuntimeError(f"Mooncake initialize({host!r}, P2PHANDSHAKE, {protocol}) failed")
        self._session = f"{host}:{self.engine.get_rpc_port()}"
        self._registered: list[int] = []
        logger.info("Mooncake engine up at %s over %s", self._session, protocol)

    @property
    def session(self) -> str:
        return self._session

    def register(self, regions: list[MemoryRegion]) -> None:
        if self._registered:
            raise RuntimeError("Mooncake memory is registered once, before peers connect")
        if not regions:
            raise ValueError("no memory regions to register")
        addrs = [r.addr for r in regions]
        lengths = [r.length for r in regions]
        if self.engine.batch_register_memory(addrs, lengths) != 0:
            raise RuntimeError(f"Mooncake batch_register_memory failed for {len(regions)} regions")
        self._registered = addrs

    def backend_meta(self) -> bytes:
        return b""

    def connect(self, peer_session: str, peer_meta: bytes) -> None:
        """Nothing to do: Mooncake opens the peer's segment on the first read."""

    def read(
        self,
        peer_session: str,
        local_addrs: list[int],
        remote_addrs: list[int],
        lengths: list[int],
    ) -> list[TransferStatus]:
        check_batch(local_addrs, remote_addrs, lengths)
        if not lengths:
            return []
        rc = self.engine.batch_transfer_sync_read(peer_session, local_addrs, remote_addrs, lengths)
        if rc < 0:
            logger.warning("Mooncake batch read of %d ranges from %s failed (rc=%d)", len(lengths), peer_session, rc)
            return [TransferStatus.FAILED] * len(lengths)
        return [TransferStatus.SUCCESS] * len(lengths)

    def close(self) -> None:
        for addr in self._registered:
            if self.engine.unregister_memory(addr) != 0:
                logger.warning("Mooncake unregister_memory(%#x) failed", addr)
        self._registered = []
        self.engine = None  # the pybind destructor tears the engine down
