"""MoRI-IO backend (ROCm/mori ``mori.io``), written against its Python API.

The engine is ``IOEngine(key, IOEngineConfig(host, port=0))`` with an RDMA (or
TCP) backend.  Our memory is registered as ``MemoryDesc``s; the handshake ships
``EngineDesc.pack()`` and each ``MemoryDesc.pack()`` in ``backend_meta()``.  A
reader registers the remote engine, opens one ``IOEngineSession`` per
(local region, remote region) pair and issues ``session.batch_read(local
offsets, remote offsets, sizes, uid)``, which returns one ``TransferStatus`` per
batch; ``Wait()`` blocks (no spinning) until it finishes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any

import msgspec

import torch

from common.kv_transfer.backend import BackendUnavailable, TransferBackend, check_batch
from common.kv_transfer.status import TransferStatus
from common.messages import MemoryRegion

logger = logging.getLogger(__name__)

READ_POLL_S = 0.0005  # how often a read's status is checked (the read itself runs in mori's threads)


class MoriMeta(msgspec.Struct, frozen=True):
    """What a peer needs to read from us: packed ``EngineDesc`` and one packed ``MemoryDesc`` per region."""

    engine_desc: bytes
    memory_descs: list[bytes]


def load_mori_io() -> Any:
    """The ``mori.io`` module, or ``BackendUnavailable`` naming the fix."""
    try:
        import mori.io
    except ImportError as e:
        raise BackendUnavailable(
            f"cannot import mori.io ({e}); fix: build and install ROCm/mori (pip install . in a "
            "ROCm environment), or use --kv-backend mooncake"
        ) from e
    return mori.io


class _Peer:
    def __init__(self, engine_desc: Any, descs: list[Any]):
        self.engine_desc = engine_desc
        self.descs = descs
        self.sessions: dict[tuple[int, int], Any] = {}


def _locate(descs: list[Any], addr: int, length: int, side: str) -> tuple[int, int]:
    """(region index, offset) of the range ``[addr, addr + length)`` inside one registered region."""
    for i, desc in enumerate(descs):
        if desc.data <= addr and addr + length <= desc.data + desc.size:
            return i, addr - desc.data
    raise ValueError(f"{side} range [{addr:#x}, +{length}) is not inside one registered region")


class MoriBackend(TransferBackend):
    name = "mori"

    @classmethod
    def build(cls, host: str, kv: torch.Tensor, *, transport: str, read_timeout_s: float) -> MoriBackend:
        device_id = (kv.device.index or 0) if kv.device.type == "cuda" else -1
        return cls(host, force_tcp=transport == "tcp", device_id=device_id, read_timeout_s=read_timeout_s)

    def __init__(self, host: str, *, force_tcp: bool = False, device_id: int = -1, read_timeout_s: float = 30.0):
        if not host:
            raise ValueError("MoRI-IO needs the host address peers reach this engine at")
        if read_timeout_s <= 0:
            raise ValueError(f"read_timeout_s must be > 0, got {read_timeout_s}")
        self.read_timeout_s = read_timeout_s
        self.io = load_mori_io()
        self.device_id = device_id
        key = f"pdserve-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.engine = self.io.IOEngine(key, self.io.IOEngineConfig(host=host, port=0))
        backend_type = self.io.BackendType.TCP if force_tcp else self.io.BackendType.RDMA
        self.engine.create_backend(backend_type)
        self._desc = self.engine.get_engine_desc()
        self._local: list[Any] = []
        self._peers: dict[str, _Peer] = {}
        self._lock = threading.Lock()
        logger.info("MoRI-IO engine %s up over %s", self._desc.key, backend_type)

    @property
    def session(self) -> str:
        return self._desc.key

    def register(self, regions: list[MemoryRegion]) -> None:
        if self._local:
            raise RuntimeError("MoRI-IO memory is registered once, before peers connect")
        if not regions:
            raise ValueError("no memory regions to register")
        loc = self.io.MemoryLocationType.CPU if self.device_id < 0 else self.io.MemoryLocationType.GPU
        self._local = [self.engine.register_memory(r.addr, r.length, self.device_id, loc) for r in regions]

    def backend_meta(self) -> bytes:
        if not self._local:
            raise RuntimeError("register memory before publishing MoRI-IO metadata")
        meta = MoriMeta(self._desc.pack(), [d.pack() for d in self._local])
        return msgspec.msgpack.encode(meta)

    def connect(self, peer_session: str, peer_meta: bytes) -> None:
        with self._lock:
            if peer_session in self._peers:
                return
            try:
                meta = msgspec.msgpack.decode(peer_meta, type=MoriMeta)
            except msgspec.DecodeError as e:
                raise ValueError(f"bad MoRI-IO metadata from {peer_session}: {e}") from e
            desc = self.io.EngineDesc.unpack(meta.engine_desc)
            if desc.key != peer_session:
                raise ValueError(f"MoRI-IO metadata is for engine {desc.key!r}, not {peer_session!r}")
            self.engine.register_remote_engine(desc)
            self._peers[peer_session] = _Peer(desc, [self.io.MemoryDesc.unpack(b) for b in meta.memory_descs])

    def _session_for(self, peer: _Peer, local_idx: int, remote_idx: int) -> Any:
        with self._lock:
            sess = peer.sessions.get((local_idx, remote_idx))
            if sess is None:
                sess = self.engine.create_session(self._local[local_idx], peer.descs[remote_idx])
                if sess is not None:
                    peer.sessions[(local_idx, remote_idx)] = sess
            return sess

    def transfer(self, peer_session: str, local_addrs: list[int], remote_addrs: list[int], lengths: list[int],
                  *, write: bool) -> list[TransferStatus]:
        """Each session's ranges in one ``batch_read`` (or ``batch_write``), polled against our deadline."""
        check_batch(local_addrs, remote_addrs, lengths)
        peer = self._peers.get(peer_session)
        if peer is None:
            raise ValueError(f"MoRI-IO peer {peer_session!r} is not connected")
        groups: dict[tuple[int, int], list[int]] = {}
        offsets: list[tuple[int, int]] = []
        for i, (la, ra, n) in enumerate(zip(local_addrs, remote_addrs, lengths)):
            li, lo = _locate(self._local, la, n, "local")
            ri, ro = _locate(peer.descs, ra, n, "remote")
            groups.setdefault((li, ri), []).append(i)
            offsets.append((lo, ro))
        result = [TransferStatus.FAILED] * len(lengths)
        pending = []
        for (li, ri), idx in groups.items():
            sess = self._session_for(peer, li, ri)
            if sess is None:
                logger.warning("MoRI-IO could not open a session to %s (regions %d->%d)", peer_session, ri, li)
                continue
            status = (sess.batch_write if write else sess.batch_read)(
                [offsets[i][0] for i in idx],
                [offsets[i][1] for i in idx],
                [lengths[i] for i in idx],
                sess.allocate_transfer_uid(),
            )
            pending.append((status, idx))
        deadline = time.monotonic() + self.read_timeout_s
        for status, idx in pending:
            # Wait() has no timeout in mori's binding: poll against our own deadline instead.
            while status.InProgress() and time.monotonic() < deadline:
                time.sleep(READ_POLL_S)
            if status.InProgress():
                logger.warning("MoRI-IO %s with %s still running after %g s: failed", "write" if write else "read", peer_session,
                               self.read_timeout_s)
            elif status.Succeeded():
                for i in idx:
                    result[i] = TransferStatus.SUCCESS
            else:
                logger.warning("MoRI-IO %s with %s failed: %s (%s)", "write" if write else "read", peer_session,
                               status.Message(), status.Code())
        return result

    def close(self) -> None:
        if self.engine is None:
            return
        for desc in self._local:
            self.engine.deregister_memory(desc)
        for peer in self._peers.values():
            self.engine.deregister_remote_engine(peer.engine_desc)
        self._local = []
        self._peers.clear()
        self.engine = None
