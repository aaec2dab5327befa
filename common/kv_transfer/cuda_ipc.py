"""Same-host KV transfer between GPU engines: the reader maps the prefill's KV through CUDA IPC.

The prefill exports its KV cache's CUDA allocation once (torch's
``UntypedStorage._share_cuda_``: an IPC handle and the storage's offset in the
allocation) in the handshake; the reader opens it once per peer
(``_new_shared_cuda``, i.e. ``cudaIpcOpenMemHandle``, on the reader's own GPU,
so a peer GPU's memory is reached over NVLink) and a read is one launch of
``range_copy``'s kernel over all its ranges (a CUDA graph per peer and direction,
captured at its first copy), on a stream of its own, so it never
waits behind (or holds up) the engine's kernels on the default stream: over
NVLink between two GPUs, within HBM when both engines share one GPU.  Nothing
goes through host memory.  Without Triton, or for ranges that are not whole
16-byte units, each range is one ``cudaMemcpyAsync`` issued straight to the CUDA
runtime torch loaded: ~10 µs a range, which held a heterogeneous-TP read of
256 ranges to 0.19x of a homogeneous one (docs/benchmarks.md).

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

from common.kv_transfer import range_copy
from common.kv_transfer.backend import BackendUnavailable, TransferBackend, check_batch
from common.kv_transfer.ranges import BlockPairs
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
    runtime.cudaSetDevice.argtypes = [ctypes.c_int]
    runtime.cudaGraphLaunch.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
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
    """A peer cache mapped on our GPU ``device``: ``base`` is where its bytes start here, ``addr`` where they
    start in the peer, ``words`` its bytes as int64 (None when its offset or length is not whole units); ``copiers``:
    the batched copy from it (False) and into it (True), made at first use."""

    __slots__ = ("storage", "base", "addr", "length", "words", "copiers")

    def __init__(self, exported: ExportedKV, device: int):
        self.storage = torch.UntypedStorage._new_shared_cuda(
            device, exported.handle, exported.storage_size, exported.storage_offset,
            exported.ref_counter_handle, exported.ref_counter_offset, exported.event_handle,
            exported.event_sync_required,
        )  # fmt: skip
        self.base = self.storage.data_ptr() + exported.offset_in_storage
        self.addr, self.length = exported.addr, exported.length
        self.words = None
        if range_copy.aligned([exported.offset_in_storage, exported.length]):
            raw = torch.empty(0, dtype=torch.uint8, device=f"cuda:{device}")
            raw.set_(self.storage, exported.offset_in_storage, (exported.length,))
            self.words = raw.view(torch.int64)
        self.copiers: dict[bool, range_copy.RangeCopier] = {}


class CudaIpcBackend(TransferBackend):
    name = "nvlink"
    # 64 MiB (a 2,048-token read of a 1B-shaped model) copied in 56 us within one H200 (measured; between two
    # over NVLink, by its bandwidth, about 3x that) against 68 us for a pool thread's hand-off and wake-up
    # (measured): smaller reads run inline.
    inline_bytes = 64 << 20

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
        nbytes = kv.numel() * kv.element_size()
        self._words = kv.view(-1).view(torch.uint8).view(torch.int64) if range_copy.aligned([nbytes]) else None
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
            self._peers[peer_session] = _Peer(exported, self.kv.device.index)

    def transfer(self, peer_session: str, local_addrs: list[int], remote_addrs: list[int], lengths: list[int],
                 *, write: bool) -> list[TransferStatus]:
        """A write copies our ranges into the peer's mapped cache (the caller waited for the kernels that
        computed them)."""
        check_batch(local_addrs, remote_addrs, lengths)
        peer = self._peers.get(peer_session)
        local = self._region
        statuses = []
        for la, ra, n in zip(local_addrs, remote_addrs, lengths):
            inside = (peer is not None and local is not None and peer.addr <= ra <= ra + n <= peer.addr + peer.length
                      and local.addr <= la <= la + n <= local.addr + local.length)
            # outside what either side registered: never touched
            statuses.append(TransferStatus.SUCCESS if inside else TransferStatus.FAILED)
        todo = [i for i, st in enumerate(statuses) if st is TransferStatus.SUCCESS]
        if not todo:
            return statuses
        self._runtime.cudaSetDevice(self.kv.device.index)  # the calling thread's runtime calls go to our GPU
        ours = [local_addrs[i] - local.addr for i in todo]
        theirs = [remote_addrs[i] - peer.addr for i in todo]
        sizes = [lengths[i] for i in todo]
        dst, src = (theirs, ours) if write else (ours, theirs)
        copier = self._copier(peer, write)
        if copier is not None and range_copy.aligned(dst, src, sizes):
            u = range_copy.UNIT
            if copier.copy([d // u for d in dst], [r // u for r in src], [n // u for n in sizes]) != 0:
                return [TransferStatus.FAILED] * len(lengths)
            return statuses  # waited for by the copy
        dst_base, src_base = (peer.base, self.kv.data_ptr()) if write else (self.kv.data_ptr(), peer.base)
        self._copy_each(todo, dst_base, dst, src_base, src, sizes, statuses)
        # The blocks are whole before the engine may compute on them (and before prefill may free them).
        if self._runtime.cudaStreamSynchronize(self._stream.cuda_stream) != 0:
            return [TransferStatus.FAILED] * len(lengths)
        return statuses

    def copy_blocks(self, peer_session: str, blocks: BlockPairs, *, write: bool) -> list[TransferStatus]:
        """Whole blocks (and the tail's ranges) in one launch of the batched copy, its table written from the
        two id lists; a copy reaching outside what either side registered (the copier refuses it before it
        copies anything), or not in whole units, goes the way of ``transfer``'s ranges (those outside FAILED)."""
        peer, local = self._peers.get(peer_session), self._region
        copier = self._copier(peer, write) if local is not None else None
        size, tail = blocks.block_bytes, blocks.tail
        if copier is not None:
            ours = (blocks.local_ids, blocks.local_base - local.addr, [a - local.addr for a in tail.local_addrs])
            theirs = (blocks.remote_ids, blocks.remote_base - peer.addr, [a - peer.addr for a in tail.remote_addrs])
            if range_copy.aligned([size, ours[1], theirs[1]], ours[2], theirs[2], tail.lengths):
                self._runtime.cudaSetDevice(self.kv.device.index)  # the calling thread's runtime calls: our GPU
                (dst_ids, dst_at, dst_tail), (src_ids, src_at, src_tail) = (theirs, ours) if write else (ours, theirs)
                u = range_copy.UNIT
                try:
                    rc = copier.copy_blocks(dst_ids, src_ids, size // u, dst_at // u, src_at // u,
                                            ([d // u for d in dst_tail], [r // u for r in src_tail],
                                             [n // u for n in tail.lengths]))
                except ValueError:
                    pass  # outside a registered region: ``transfer`` fails those ranges
                else:
                    return [TransferStatus.FAILED if rc else TransferStatus.SUCCESS] * blocks.count
        return super().copy_blocks(peer_session, blocks, write=write)

    def _copier(self, peer: _Peer | None, write: bool) -> range_copy.RangeCopier | None:
        """The batched copy between our cache and ``peer``'s in that direction, made at first use; None when
        it cannot run (no Triton, a cache not whole units, an unknown peer)."""
        if peer is None or peer.words is None or self._words is None or not range_copy.available():
            return None
        copier = peer.copiers.get(write)
        if copier is None:
            dst, src = (peer.words, self._words) if write else (self._words, peer.words)
            copier = peer.copiers[write] = range_copy.RangeCopier(dst, src, self._stream, self._runtime)
        return copier

    def _copy_each(self, todo: list[int], dst_base: int, dst: list[int], src_base: int, src: list[int],
                   sizes: list[int], statuses: list[TransferStatus]) -> None:
        """One ``cudaMemcpyAsync`` per range (byte offsets from the two bases); a refused one is FAILED."""
        stream = self._stream.cuda_stream
        for i, d, r, n in zip(todo, dst, src, sizes):
            if self._runtime.cudaMemcpyAsync(dst_base + d, src_base + r, n, MEMCPY_DEVICE_TO_DEVICE, stream) != 0:
                statuses[i] = TransferStatus.FAILED

    def close(self) -> None:
        self._peers.clear()
        self._region = None
