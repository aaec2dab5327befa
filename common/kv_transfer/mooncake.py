"""Mooncake Transfer Engine backend.

The ``mooncake`` module comes from one of three builds, one per host kind (pdserve's extras
``cpu``, ``cuda12``, ``cuda13``: see pyproject.toml).  P2PHANDSHAKE metadata (no etcd): each
engine binds an RPC port and peers address it as ``host:rpc_port``.  RDMA when NICs exist, TCP
otherwise or when forced (``MC_FORCE_TCP=1``).  Batch reads and writes (push mode) are synchronous
and busy-poll: run them off the event loop.

Mooncake logs through glog straight to file descriptor 2.  Its level follows ``--log-level``
(``MC_LOG_LEVEL``, read when the module loads; Mooncake's own INFO lines show at ``debug``), and
the lines it prints on every healthy start (``BENIGN_START_LINES``) are dropped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from typing import Any, Iterator

import torch

from common.hosts import connect_problem, is_local, resolve
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


GLOG_LEVELS = {logging.DEBUG: "INFO", logging.INFO: "WARNING", logging.WARNING: "WARNING",
               logging.ERROR: "ERROR", logging.CRITICAL: "FATAL"}  # our level -> the least severe glog shows
BENIGN_START_LINES = (
    "Logging before InitGoogleLogging",  # glog's notice that it logs to stderr: what we want
    "Using default malloc/free for protocol",  # TCP needs no special allocator
    # P2PHANDSHAKE: initialize() looks up this engine's own segment before the transport it installs next
    # has published it (the transport's "listen on port" line follows); nothing is missing once it returns.
    "Local segment descriptor not found",
)


def glog_level() -> str:
    """The glog level (``MC_LOG_LEVEL``) matching this module's effective log level."""
    level = logger.getEffectiveLevel()
    return next((name for lvl, name in sorted(GLOG_LEVELS.items()) if level <= lvl), "FATAL")


@contextlib.contextmanager
def without_benign_start_lines() -> Iterator[None]:
    """Inside the block, fd 2 goes through a pipe that forwards every line but ``BENIGN_START_LINES``
    as it comes (so a library abort still leaves its last words on stderr)."""
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    saved = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        with os.fdopen(read_end, "rb") as lines:
            for line in lines:
                if not any(b.encode() in line for b in BENIGN_START_LINES):
                    os.write(saved, line)

    forwarder = threading.Thread(target=forward, name="mooncake-stderr", daemon=True)
    forwarder.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last write end closes: the forwarder reads to its end
        forwarder.join()
        os.close(saved)


def load_transfer_engine_class() -> Any:
    """``mooncake.engine.TransferEngine`` with glog at our level (unless ``MC_LOG_LEVEL`` is set),
    or ``BackendUnavailable`` naming the fix."""
    os.environ.setdefault("MC_LOG_LEVEL", glog_level())
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
        protocol = "tcp" if self.use_tcp else "rdma"
        with without_benign_start_lines():
            self.engine = engine_cls()
            status = self.engine.initialize(host, "P2PHANDSHAKE", protocol, "")
        if status != 0:
            raise RuntimeError(f"Mooncake initialize({host!r}, P2PHANDSHAKE, {protocol}) failed")
        self._session = f"{host}:{self.engine.get_rpc_port()}"
        self._registered: list[int] = []
        # Mooncake binds its RPC and TCP data ports to INADDR_ANY whatever the host (no bind address in
        # its API or environment, MC_TCP_BIND_ADDRESS only names the advertised address): say so.
        logger.info("Mooncake engine up at %s over %s (it listens on all interfaces)", self._session, protocol)
        if not any(is_local(a) for a in resolve(host)):
            problem = connect_problem(host, self.engine.get_rpc_port())
            if problem is not None:  # a wrong --kv-host, not a NAT address that forwards here
                logger.warning("--kv-host %s is not an address of this host and connecting to %s from here fails "
                               "(%s): peers will not reach this engine's KV there", host, self._session, problem)

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

    def transfer(self, peer_session: str, local_addrs: list[int], remote_addrs: list[int], lengths: list[int],
                  *, write: bool) -> list[TransferStatus]:
        """One synchronous batch (Mooncake's ``batch_transfer_sync_read`` or ``_write``): all or nothing."""
        check_batch(local_addrs, remote_addrs, lengths)
        if not lengths:
            return []
        call = self.engine.batch_transfer_sync_write if write else self.engine.batch_transfer_sync_read
        rc = call(peer_session, local_addrs, remote_addrs, lengths)
        if rc < 0:
            logger.warning("Mooncake batch %s of %d ranges with %s failed (rc=%d)", "write" if write else "read",
                           len(lengths), peer_session, rc)
            return [TransferStatus.FAILED] * len(lengths)
        return [TransferStatus.SUCCESS] * len(lengths)

    def close(self) -> None:
        for addr in self._registered:
            if self.engine.unregister_memory(addr) != 0:
                logger.warning("Mooncake unregister_memory(%#x) failed", addr)
        self._registered = []
        self.engine = None  # the pybind destructor tears the engine down
