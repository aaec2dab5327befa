"""Same-host KV transfer between GPU engines: the reader maps the prefill's KV through CUDA IPC.

The prefill exports its KV cache's CUDA allocation once (torch's
``UntypedStorage._share_cuda_``: an IPC handle and the storage's offset in the
allocation) in the handshake; the reader opens it once per peer
(``_new_shared_cuda``, i.e. ``cudaIpcOpenMemHandle``) and a read is one
device-to-device ``cudaMemcpyAsync`` per range on a stream of its own, so it
never waits behind (or holds up) the engine's kernels on the default stream:
over NVLink between two GPUs, within HBM when both engines share one GPU.
Nothing goes through host memory.  The copies are issued straight to the CUDA
runtime torch loaded (a few microseconds each): a torch ``copy_`` of tensor
slices per range costs several times that, which halved the read rate of a
64 MiB request in 16 ranges on an H200 (docs/benchmarks.md).

Ordering: the prefill sampled the first token before it published the blocks,
which synchronised the kernels that wrote them; the reader waits for its copy
stream before it returns, so the decode engine never computes on half-copied
blocks.  Needs both processes in one PID and IPC namespace and the KV cache in
ordinary ``cudaMalloc`` memory (not ``expandable_segments``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import uuid
from functools import cache

import msgspec
import torch

from common.kv_transfer.backend import BackendUnavailable, TransferBackend, check_batch
from common.kv_transfer.status import TransferStatus
from common.messages import MemoryRegion

logger = logging.getLogger(__name__)

MEMCPY_DEVICE_TO_DEVICE = 3  # cudaMemcpyKind


@cache
def cuda_runtime() -> ctypes.CDLL:
    """The CUDA runtime torch loaded, with the two calls a read makes; ``BackendUnavailable`` without it."""
    name = f"libcudart.so.{(torch.version.cuda or '0').split('.')[0]}"
    try:
        runtime = ctypes.CDLL(name)
    except OSError as e:
        raise BackendUnavailable(f"CUDA IPC needs the CUDA runtime torch uses ({name}): {e}") from e
    runtime.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                        ctypes.c_void_p]
    runtime.cudaStreamSynchronize.argtypes = [ctypes.c_void_p]
    return runtime


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
    """A mapped peer cache: ``base`` is where its bytes start here, ``addr`` where they start in the peer."""

    __slots__ = ("storage", "base", "addr", "length")

    def __init__(self, exported: ExportedKV):
        self.storage = torch.UntypedStorage._new_shared_cuda(
            exported.device, exported.handle, exported.storage_size, exported.storage_offset,
            exported.ref_counter_handle, exported.ref_counter_offset, exported.event_handle,
            exported.event_sync_required,
        )  # fmt: skip
        self.base = self.storage.data_ptr() + exported.offset_in_storage
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
        self._runtime = cuda_runtime()
        self._session = f"cuda-ipc:{host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stream = torch.cuda.Stream(device=kv.device)
        self._region: MemoryRegion | None = None
        self._peers: dict[str, _Peer] = {}

    @property
    def session(self) -> str:
        return self._session

    def register(self, regions: list[MemoryRegion]) -> None:
        whole = MemoryRegion(self.kv.data_ptr(), self.kv.numel() * self.kv.element_size())
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
            self._peers[peer_session] = _Peer(exported)

    def read(self, peer_session: str, local_addrs: list[int], remote_addrs: list[int],
             lengths: list[int]) -> list[TransferStatus]:
        check_batch(local_addrs, remote_addrs, lengths)
        peer = self._peers.get(peer_session)
        local = self._region
        stream = self._stream.cuda_stream
        statuses = []
        torch.cuda.set_device(self.kv.device)  # this reader thread's runtime calls go to our GPU
        for la, ra, n in zip(local_addrs, remote_addrs, lengths):
            if (peer is None or local is None or not peer.addr <= ra <= ra + n <= peer.addr + peer.length
                    or not local.addr <= la <= la + n <= local.addr + local.length):
                statuses.append(TransferStatus.FAILED)  # outside what either side registered: never touched
                continue
            rc = self._runtime.cudaMemcpyAsync(la, peer.base + ra - peer.addr, n, MEMCPY_DEVICE_TO_DEVICE, stream)
            statuses.append(TransferStatus.SUCCESS if rc == 0 else TransferStatus.FAILED)
        # The blocks are whole before the engine may compute on them (and before prefill may free them).
        if self._runtime.cudaStreamSynchronize(stream) != 0:
            return [TransferStatus.FAILED] * len(lengths)
        return statuses

    def close(self) -> None:
        self._peers.clear()
        self._region = None
