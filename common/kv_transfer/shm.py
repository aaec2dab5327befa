"""Same-host KV transfer between host-memory engines: the KV cache is a shared-memory file.

An engine that serves KV on the CPU allocates its cache in ``/dev/shm``
(``SharedKVFile``): a ``MAP_SHARED`` mapping of a file named after the process.
``ShmBackend.register`` finds the file behind each registered region in
``/proc/self/maps`` and publishes it; a reader on the same host maps the peer's
file read-only once (``connect``) and a read is one ``memcpy`` per range, with
no copy through a socket and no busy-polling thread.  A push-mode writer maps the
peer's file read-write on its first ``write`` and copies the other way.

The file is unlinked by its owner at close; a file left by a killed process is
removed by the next engine that starts on the host.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import re
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import torch

from common.kv_transfer.backend import BackendUnavailable, TransferBackend, check_batch
from common.kv_transfer.status import TransferStatus
from common.messages import MemoryRegion

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PREFIX = "pdserve-kv-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_files(directory: Path = SHM_DIR, prefix: str = PREFIX) -> list[str]:
    """Unlink files named ``<prefix><pid>-...`` (KV files by default) whose owning process is gone (it was
    killed before closing them)."""
    removed = []
    owned = re.compile(rf"^{re.escape(prefix)}(\d+)-")
    for path in directory.glob(f"{prefix}*"):
        match = owned.match(path.name)
        if match and not _alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    if removed:
        logger.info("removed files left by dead processes: %s", ", ".join(removed))
    return removed


class SharedKVFile:
    """Owns one ``/dev/shm`` file holding a KV cache; ``allocate`` maps it, ``close`` unlinks it.

    Where the file does not fit, ``allocate`` raises ``BackendUnavailable`` or, with ``fallback``,
    logs and returns private memory (then no file exists and the shm transport is not served).
    """

    def __init__(self, *, fallback: bool, directory: Path = SHM_DIR):
        self.fallback = fallback
        self.directory = directory
        self.path: Path | None = None

    @staticmethod
    def fits(nbytes: int, directory: Path) -> bool:
        """Whether ``directory`` has room for ``nbytes`` (touching pages beyond it would SIGBUS)."""
        if not directory.is_dir():
            return False
        st = os.statvfs(directory)
        return st.f_bavail * st.f_frsize >= nbytes

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """A zeroed tensor of ``shape`` backed by a new file; ``BackendUnavailable`` when it does not fit."""
        if torch.device(device).type != "cpu":
            raise ValueError("shared-memory KV files hold host memory only")
        if self.path is not None:
            raise RuntimeError(f"{self.path} is already allocated")
        numel = 1
        for n in shape:
            numel *= n
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        remove_stale_files(self.directory)
        if not self.fits(nbytes, self.directory):
            message = (f"{self.directory} has no room for a {nbytes / 2**20:.0f} MiB KV cache "
                       f"(in a container: raise shm_size, or use ipc: host)")
            if not self.fallback:
                raise BackendUnavailable(message)
            logger.warning("%s: KV to engines on this host goes over the network transport", message)
            return torch.zeros(shape, dtype=dtype, device=device)
        self.path = self.directory / f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tensor = torch.from_file(str(self.path), shared=True, size=numel, dtype=dtype).view(shape)
        tensor.zero_()  # fault every page in now, not during the first transfer
        return tensor

    def close(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


class SharedRegion(msgspec.Struct, frozen=True, array_like=True):
    """A registered region as a peer maps it: its address in the owner, its file and offset there."""

    addr: int
    length: int
    path: str
    offset: int


def backing_file(addr: int, length: int, maps: str) -> tuple[str, int] | None:
    """The ``/dev/shm`` file and file offset behind ``[addr, addr + length)`` in a ``/proc/<pid>/maps`` text."""
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or not fields[5].startswith(f"{SHM_DIR}/"):
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= addr and addr + length <= end:
            return fields[5], int(fields[2], 16) + addr - start
    return None


@dataclass
class _Mapped:
    region: SharedRegion
    mapping: mmap.mmap
    base: int  # where region.addr is mapped in this process


class ShmBackend(TransferBackend):
    name = "shm"
    read_shards = 2  # one memcpy thread does not saturate memory: two reached 0.81x a 2-core copy, one 0.52x

    @classmethod
    def build(cls, host: str, kv: torch.Tensor, *, transport: str, read_timeout_s: float) -> ShmBackend:
        """Reads never wait on a peer: ``read_timeout_s`` does not concern a ``memcpy``."""
        return cls(host)

    def __init__(self, host: str):
        self._session = f"shm:{host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._local: list[MemoryRegion] = []
        self._published: list[SharedRegion] = []
        self._peers: dict[str, list[_Mapped]] = {}  # read-only mappings, by peer session
        self._writable: dict[str, list[_Mapped]] = {}  # read-write mappings of the peers a push wrote to
        self._lock = threading.Lock()

    @property
    def session(self) -> str:
        return self._session

    def register(self, regions: list[MemoryRegion]) -> None:
        if self._local:
            raise RuntimeError("shared-memory regions are registered once")
        maps = Path("/proc/self/maps").read_text()
        for r in regions:
            found = backing_file(r.addr, r.length, maps)
            if found is None:
                raise BackendUnavailable(f"KV memory at {r.addr:#x} is not a {SHM_DIR} file: allocate the KV cache "
                                         "with SharedKVFile to serve it over shared memory")
            self._published.append(SharedRegion(r.addr, r.length, *found))
        self._local = list(regions)

    def backend_meta(self) -> bytes:
        return msgspec.msgpack.encode(self._published)

    def connect(self, peer_session: str, peer_meta: bytes) -> None:
        """Map the peer's files read-only (once per session); ``FileNotFoundError`` when not visible here."""
        if peer_session not in self._peers:
            self._peers[peer_session] = self._map(msgspec.msgpack.decode(peer_meta, type=list[SharedRegion]),
                                                  writable=False)

    @staticmethod
    def _map(regions: list[SharedRegion], *, writable: bool) -> list[_Mapped]:
        mapped = []
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        for region in regions:
            page_offset = region.offset - region.offset % mmap.ALLOCATIONGRANULARITY
            with open(region.path, "r+b" if writable else "rb") as f:
                mapping = mmap.mmap(f.fileno(), region.length + region.offset - page_offset,
                                    flags=mmap.MAP_SHARED, prot=prot, offset=page_offset)
            base = np.frombuffer(mapping, dtype=np.uint8).ctypes.data + region.offset - page_offset
            mapped.append(_Mapped(region, mapping, base))
        return mapped

    def transfer(self, peer_session: str, local_addrs: list[int], remote_addrs: list[int], lengths: list[int],
                 *, write: bool) -> list[TransferStatus]:
        """A write (push mode) maps the peer's files again, read-write, the first time."""
        if write:
            with self._lock:  # the shards of one write run on several threads
                if peer_session not in self._writable and peer_session in self._peers:
                    self._writable[peer_session] = self._map([m.region for m in self._peers[peer_session]],
                                                             writable=True)
        mapped = (self._writable if write else self._peers).get(peer_session, [])
        return self._copy(mapped, local_addrs, remote_addrs, lengths, write=write)

    def _copy(self, mapped: list[_Mapped], local_addrs: list[int], remote_addrs: list[int], lengths: list[int],
              *, write: bool) -> list[TransferStatus]:
        check_batch(local_addrs, remote_addrs, lengths)
        local = np.asarray(local_addrs, dtype=np.int64)
        remote = np.asarray(remote_addrs, dtype=np.int64)
        n = np.asarray(lengths, dtype=np.int64)
        # A range outside what either side registered is never touched (FAILED); the checks run once
        # per batch, not once per range: a read between different block sizes has thousands of ranges.
        inside = np.zeros(len(n), dtype=bool)
        for r in self._local:
            inside |= (local >= r.addr) & (local + n <= r.addr + r.length)
        peer = np.full(len(n), -1, dtype=np.int64)  # where each remote range is mapped here
        for m in mapped:
            hit = (peer < 0) & (remote >= m.region.addr) & (remote + n <= m.region.addr + m.region.length)
            peer[hit] = remote[hit] - m.region.addr + m.base
        ok = inside & (peer >= 0)
        dsts, srcs = (peer, local) if write else (local, peer)
        memmove = ctypes.memmove
        for dst, src, size in zip(dsts[ok].tolist(), srcs[ok].tolist(), n[ok].tolist()):
            memmove(dst, src, size)  # releases the GIL
        return [TransferStatus.SUCCESS if good else TransferStatus.FAILED for good in ok.tolist()]

    def close(self) -> None:
        for mapped in (*self._peers.values(), *self._writable.values()):
            for m in mapped:
                m.mapping.close()
        self._peers.clear()
        self._writable.clear()
        self._local = []
