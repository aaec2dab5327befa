"""A fake ``mori.io`` for hosts without ROCm/RDMA, following ROCm/mori's Python API.

Same names and signatures as ``python/mori/io/engine.py`` and the pybind module
(``IOEngine``, ``IOEngineSession``, ``IOEngineConfig``, ``BackendType``,
``MemoryLocationType``, ``StatusCode``, ``TransferStatus``, ``EngineDesc``,
``MemoryDesc``, ``RdmaBackendConfig``) and the same status semantics: a
transfer's status starts ``IN_PROGRESS``, completes on a worker thread, and
``Wait()`` blocks until it is ``SUCCESS`` or an ``ERR_*`` code.  Engines of one
process form one "fabric": reads really ``memmove`` between registered host
buffers, and fail (``ERR_NOT_FOUND`` / ``ERR_INVALID_ARGS``) for unknown
engines, unregistered memory or out-of-bounds offsets.

Knobs (``knobs``): ``fail_next`` batch transfers fail with ``ERR_RDMA_OP``;
every transfer takes ``delay_s`` seconds.  ``install()`` puts the module in
``sys.modules`` as ``mori`` / ``mori.io``; ``uninstall()`` removes it.
"""

from __future__ import annotations

import ctypes
import enum
import sys
import threading
import types
from dataclasses import dataclass

import msgspec


class BackendType(enum.IntEnum):
    Unknown = 0
    XGMI = 1
    RDMA = 2
    TCP = 3


class MemoryLocationType(enum.IntEnum):
    Unknown = 0
    CPU = 1
    GPU = 2


class StatusCode(enum.IntEnum):
    SUCCESS = 0
    INIT = 1
    IN_PROGRESS = 2
    ERR_INVALID_ARGS = 3
    ERR_NOT_FOUND = 4
    ERR_RDMA_OP = 5
    ERR_BAD_STATE = 6
    ERR_GPU_OP = 7


class PollCqMode(enum.IntEnum):
    POLLING = 0
    EVENT = 1


class RdmaBackendConfig:
    def __init__(
        self,
        qp_per_transfer: int = 1,
        post_batch_size: int = -1,
        num_worker_threads: int = -1,
        poll_cq_mode: PollCqMode = PollCqMode.POLLING,
        enable_notification: bool = True,
    ):
        self.qp_per_transfer = qp_per_transfer
        self.post_batch_size = post_batch_size
        self.num_worker_threads = num_worker_threads
        self.poll_cq_mode = poll_cq_mode
        self.enable_notification = enable_notification


class TcpBackendConfig:
    pass


class IOEngineConfig:
    def __init__(self, host: str = "", port: int = 0):
        self.host = host
        self.port = port


class TransferStatus:
    def __init__(self) -> None:
        self._code = StatusCode.INIT
        self._message = ""
        self._done = threading.Event()

    def Code(self) -> StatusCode:
        return self._code

    def Message(self) -> str:
        return self._message

    def Init(self) -> bool:
        return self._code == StatusCode.INIT

    def InProgress(self) -> bool:
        return self._code == StatusCode.IN_PROGRESS

    def Succeeded(self) -> bool:
        return self._code == StatusCode.SUCCESS

    def Failed(self) -> bool:
        return self._code > StatusCode.IN_PROGRESS

    def SetCode(self, code: StatusCode) -> None:
        self._code = code
        if code == StatusCode.SUCCESS or code > StatusCode.IN_PROGRESS:
            self._done.set()

    def SetMessage(self, message: str) -> None:
        self._message = message

    def Update(self, code: StatusCode, message: str) -> None:
        self.SetMessage(message)
        self.SetCode(code)

    def Wait(self) -> None:
        self._done.wait()


class _Packable(msgspec.Struct, frozen=True):
    def pack(self) -> bytes:
        return msgspec.msgpack.encode(self)

    @classmethod
    def unpack(cls, b: bytes):
        return msgspec.msgpack.decode(b, type=cls)


class EngineDesc(_Packable, frozen=True):
    key: str
    node_id: str
    hostname: str
    host: str
    port: int


class MemoryDesc(_Packable, frozen=True):
    engine_key: str = ""
    id: int = 0
    device_id: int = -1
    data: int = 0
    size: int = 0
    loc: int = MemoryLocationType.Unknown


@dataclass
class Knobs:
    fail_next: int = 0
    delay_s: float = 0.0


knobs = Knobs()
_fabric: dict[str, "IOEngine"] = {}
_fabric_lock = threading.Lock()


def reset() -> None:
    """Forget every engine and knob (between tests)."""
    global knobs
    knobs = Knobs()
    with _fabric_lock:
        _fabric.clear()


class IOEngineSession:
    def __init__(self, engine: "IOEngine", local: MemoryDesc, remote: MemoryDesc):
        self._engine = engine
        self._local = local
        self._remote = remote

    def allocate_transfer_uid(self) -> int:
        return self._engine.allocate_transfer_uid()

    def read(self, local_offset, remote_offset, size, transfer_uid) -> TransferStatus:
        return self.batch_read([local_offset], [remote_offset], [size], transfer_uid)

    def write(self, local_offset, remote_offset, size, transfer_uid) -> TransferStatus:
        return self.batch_write([local_offset], [remote_offset], [size], transfer_uid)

    def batch_read(self, local_offsets, remote_offsets, sizes, transfer_uid) -> TransferStatus:
        return self._engine._submit(self._local, local_offsets, self._remote, remote_offsets, sizes, read=True)

    def batch_write(self, local_offsets, remote_offsets, sizes, transfer_uid) -> TransferStatus:
        return self._engine._submit(self._local, local_offsets, self._remote, remote_offsets, sizes, read=False)

    def alive(self) -> bool:
        return self._engine._alive(self._remote)


class IOEngine:
    def __init__(self, key: str, config: IOEngineConfig):
        with _fabric_lock:
            if key in _fabric:
                raise RuntimeError(f"engine key {key!r} already in use")
            _fabric[key] = self
        self._desc = EngineDesc(key, "fake-node", "fake-host", config.host, config.port)
        self._backends: set[BackendType] = set()
        self._remotes: set[str] = set()
        self._memory: dict[int, MemoryDesc] = {}
        self._next_mem = 0
        self._next_uid = 0
        self._lock = threading.Lock()

    def get_engine_desc(self) -> EngineDesc:
        return self._desc

    def create_backend(self, type: BackendType, config=None) -> None:
        if type not in (BackendType.RDMA, BackendType.XGMI, BackendType.TCP):
            raise NotImplementedError("backend not implemented yet")
        self._backends.add(type)

    def remove_backend(self, type: BackendType) -> None:
        self._backends.discard(type)

    def register_remote_engine(self, engine_desc: EngineDesc) -> None:
        self._remotes.add(engine_desc.key)

    def deregister_remote_engine(self, engine_desc: EngineDesc) -> None:
        self._remotes.discard(engine_desc.key)

    def register_memory(self, ptr: int, size: int, device_id: int, mem_loc: MemoryLocationType) -> MemoryDesc:
        with self._lock:
            self._next_mem += 1
            desc = MemoryDesc(self._desc.key, self._next_mem, device_id, ptr, size, int(mem_loc))
            self._memory[desc.id] = desc
        return desc

    def register_torch_tensor(self, tensor) -> MemoryDesc:
        if not tensor.is_contiguous():
            raise RuntimeError("input tensor must be contiguous")
        loc = MemoryLocationType.CPU if tensor.device.type == "cpu" else MemoryLocationType.GPU
        device_id = -1 if tensor.device.index is None else tensor.device.index
        return self.register_memory(tensor.data_ptr(), tensor.nelement() * tensor.element_size(), device_id, loc)

    def deregister_memory(self, mem_desc: MemoryDesc) -> None:
        with self._lock:
            self._memory.pop(mem_desc.id, None)

    def allocate_transfer_uid(self) -> int:
        with self._lock:
            self._next_uid += 1
            return self._next_uid

    def create_session(self, local_mem: MemoryDesc, remote_mem: MemoryDesc) -> IOEngineSession | None:
        if not self._backends or remote_mem.engine_key not in self._remotes:
            return None
        return IOEngineSession(self, local_mem, remote_mem)

    def pop_inbound_transfer_status(self, remote_key, transfer_uid):
        return None

    # -- the fabric ----------------------------------------------------------

    def _alive(self, remote: MemoryDesc) -> bool:
        with _fabric_lock:
            return remote.engine_key in _fabric

    def _submit(self, local, local_offsets, remote, remote_offsets, sizes, *, read: bool) -> TransferStatus:
        status = TransferStatus()
        status.SetCode(StatusCode.IN_PROGRESS)
        fail = knobs.fail_next > 0
        if fail:
            knobs.fail_next -= 1
        args = (status, local, list(local_offsets), remote, list(remote_offsets), list(sizes), read, fail)
        timer = threading.Timer(knobs.delay_s, self._complete, args)
        timer.daemon = True
        timer.start()
        return status

    def _complete(self, status, local, local_offsets, remote, remote_offsets, sizes, read, fail) -> None:
        if fail:
            status.Update(StatusCode.ERR_RDMA_OP, "injected transfer failure")
            return
        if not (len(local_offsets) == len(remote_offsets) == len(sizes)):
            status.Update(StatusCode.ERR_INVALID_ARGS, "offset and size lists differ in length")
            return
        with _fabric_lock:
            peer = _fabric.get(remote.engine_key)
        if peer is None or remote.id not in peer._memory or local.id not in self._memory:
            status.Update(StatusCode.ERR_NOT_FOUND, "memory or engine not registered")
            return
        for lo, ro, n in zip(local_offsets, remote_offsets, sizes):
            if lo < 0 or ro < 0 or n <= 0 or lo + n > local.size or ro + n > remote.size:
                status.Update(StatusCode.ERR_INVALID_ARGS, f"range out of bounds ({lo}, {ro}, {n})")
                return
        for lo, ro, n in zip(local_offsets, remote_offsets, sizes):
            src, dst = (remote.data + ro, local.data + lo) if read else (local.data + lo, remote.data + ro)
            ctypes.memmove(dst, src, n)
        status.SetCode(StatusCode.SUCCESS)


def install() -> types.ModuleType:
    """Make ``import mori.io`` load this module; returns it."""
    pkg = types.ModuleType("mori")
    pkg.io = sys.modules[__name__]  # type: ignore[attr-defined]
    sys.modules["mori"] = pkg
    sys.modules["mori.io"] = sys.modules[__name__]
    return sys.modules[__name__]


def uninstall() -> None:
    sys.modules.pop("mori", None)
    sys.modules.pop("mori.io", None)
    reset()
