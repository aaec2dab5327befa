"""Same-host KV transfer between GPU engines: the reader maps the prefill's KV through CUDA IPC.

The prefill exports its KV cache's CUDA allocation once (torch's
``UntypedStorage._share_cuda_``: an IPC handle and the storage's offset in the
allocation) in the handshake; the reader opens it once per peer
(``_new_shared_cuda``, i.e. ``cudaIpcOpenMemHandle``) and a read is one
device-to-device ``copy_`` per range on a stream of its own, so it never waits
behind (or holds up) the engine's kernels on the default stream: over NVLink
between two GPUs, within HBM when both engines share one GPU.  Nothing goes
through host memory.

Ordering: the prefill sampled the first token before it published the blocks,
which synchronised the kernels that wrote them; the reader waits for its copy
stream before it returns, so the decode engine never computes on half-copied
blocks.  Needs both processes in one PID and IPC namespace and the KV cache in
ordinary ``cudaMalloc`` memory (not ``expandable_segments``).
"""

from __future__ import annotations

import logging
import os
import uuid

import msgspec
import torch

from common.kv_transfer.backend import BackendUnavailable, TransferBackend, check_batch
from common.kv_transfer.status import TransferStatus
from common.messages import MemoryRegion

logger = logging.getLogger(__name__)


class ExportedKV(msgspec.Struct, frozen=True, array_like=True):
    """What a reader needs to map a peer's KV cache: ``_share_cuda_``'s tuple plus where the cache
    starts (its address in the owner and its byte offset in the storage)."""

    device: int
    handle: bytes
    storage_size: int
    storage_offset: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes
    event_sync_required: bool
    addr: int
    length: int
    offset_in_storage: int


class _Peer:
    """A mapped peer cache: ``data`` holds its bytes, ``addr`` is where they start in the peer."""

    __slots__ = ("storage", "data", "addr", "length")

    def __init__(self, exported: ExportedKV, device: torch.device):
        self.storage = torch.UntypedStorage._new_shared_cuda(
            exported.device, exported.handle, exported.storage_size, exported.storage_offset,
            exported.ref_counter_handle, exported.ref_counter_offset, exported.event_handle,
            exported.event_sync_required,
        )  # fmt: skip
        whole = torch.empty(0, dtype=torch.uint8, device=device).set_(self.storage)
        self.data = whole[exported.offset_in_storage:exported.offset_in_storage + exported.length]
        self.addr, self.length = exported.addr, exported.length


class CudaIpcBackend(TransferBackend):
    name = "nvlink"

    @classmethod
    def build(cls, host: str, kv: torch.Tensor, *, transport: str, read_timeout_s: float) -> CudaIpcBackend:
        """Copies run on the local GPU and cannot hang on a peer: ``read_timeout_s`` does not concern them."""
        return cls(host, kv)

    def __init__(self, host: str, kv: torch.Tensor):
        if kv.device.type != "cuda":
            raise BackendUnavailable(f"CUDA IPC moves GPU memory; this KV cache is on {kv.device}")
        if not kv.is_contiguous():
            raise ValueError("the KV cache tensor must be contiguous")
        self.kv = kv
        self.bytes = kv.view(-1).view(torch.uint8)
        self._session = f"cuda-ipc:{host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stream = torch.cuda.Stream(device=kv.device)
        self._region: MemoryRegion | None = None
        self._peers: dict[str, _Peer] = {}

    @property
    def session(self) -> str:
        return self._session

    def register(self, regions: list[MemoryRegion]) -> None:
        whole = MemoryRegion(self.kv.data_ptr(), self.bytes.numel())
        if regions != [whole]:
            raise ValueError(f"CUDA IPC serves exactly the KV cache tensor {whole}, not {regions}")
        self._region = whole

    def backend_meta(self) -> bytes:
        if self._region is None:
            raise RuntimeError("register the KV cache before publishing it")
        storage = self.kv.untyped_storage()
        shared = storage._share_cuda_()
        offset = self.kv.data_ptr() - storage.data_ptr()
        return msgspec.msgpack.encode(ExportedKV(*shared, self._region.addr, self._region.length, offset))

    def connect(self, peer_session: str, peer_meta: bytes) -> None:
        if peer_session not in self._peers:
            exported = msgspec.msgpack.decode(peer_meta, type=ExportedKV)
            self._peers[peer_session] = _Peer(exported, self.kv.device)

    def read(self, peer_session: str, local_addrs: list[int], remote_addrs: list[int],
             lengths: list[int]) -> list[TransferStatus]:
        check_batch(local_addrs, remote_addrs, lengths)
        peer = self._peers.get(peer_session)
        local = self._region
        statuses = []
        with torch.cuda.stream(self._stream):
            for la, ra, n in zip(local_addrs, remote_addrs, lengths):
                if (peer is None or local is None or not peer.addr <= ra <= ra + n <= peer.addr + peer.length
                        or not local.addr <= la <= la + n <= local.addr + local.length):
                    statuses.append(TransferStatus.FAILED)  # outside what either side registered: never touched
                    continue
                lo, ro = la - local.addr, ra - peer.addr
                self.bytes[lo:lo + n].copy_(peer.data[ro:ro + n], non_blocking=True)
                statuses.append(TransferStatus.SUCCESS)
        self._stream.synchronize()  # the blocks are whole before the engine may compute on them
        return statuses

    def close(self) -> None:
        self._peers.clear()
        self._region = None
