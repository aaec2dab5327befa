"""Same-host lease confirmation: a shared-memory table of lease generations.

The prefill process that owns the leases creates ``LeaseSlots``: a small
``/dev/shm`` file named after the engine (unlinked at ``close``; one left by a
killed process is removed by the next one that starts on the host) holding one
64-bit generation per slot.  Each leased transfer takes a free slot and bumps
its generation to an odd value (leased), which travels in its
``KVTransferParams``; releasing the transfer bumps it again (even: free) BEFORE
its blocks are given back, so a generation never repeats.

A reader on the same host maps the table read-only (``LeaseSlotsView``, named in
the handshake) and, after its copy completed, checks the slot still holds the
generation its params carry: then the blocks were not released (nor reused)
while it read, which the ``RenewLease`` round trip after the read proves for a
reader on another host.  An aligned 64-bit word is written and read whole.
"""

from __future__ import annotations

import mmap
import os
import re
import uuid
from pathlib import Path

from common.kv_transfer.shm import SHM_DIR, remove_stale_files

PREFIX = "pdserve-leases-"
SLOT_BYTES = 8
DEFAULT_SLOTS = 4096  # live transfers with a same-host confirmation; the rest confirm over the bus
_NAME = re.compile(rf"^{PREFIX}\d+-[A-Za-z0-9_.-]+$")


class LeaseSlots:
    """The owner's table: ``take`` a slot per leased transfer, ``free`` it before the blocks are released."""

    def __init__(self, engine_id: str, num_slots: int = DEFAULT_SLOTS, directory: Path = SHM_DIR):
        if num_slots <= 0:
            raise ValueError(f"num_slots must be > 0, got {num_slots}")
        remove_stale_files(directory, PREFIX)
        safe_id = re.sub(r"[^A-Za-z0-9_.-]", "_", engine_id)[:64]
        self.path = directory / f"{PREFIX}{os.getpid()}-{safe_id}-{uuid.uuid4().hex[:8]}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, num_slots * SLOT_BYTES)
            self._map = mmap.mmap(fd, num_slots * SLOT_BYTES)
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        self._generations = memoryview(self._map).cast("Q")
        self._free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first

    @property
    def name(self) -> str:
        """The file name a same-host reader opens (``LeaseSlotsView``)."""
        return self.path.name

    def __len__(self) -> int:
        """Slots held by live transfers."""
        return len(self._generations) - len(self._free)

    def take(self) -> tuple[int, int] | None:
        """A free slot, now leased: (slot, its generation); None when every slot is taken."""
        if not self._free:
            return None
        slot = self._free.pop()
        self._generations[slot] += 1
        return slot, self._generations[slot]

    def free(self, slot: int) -> None:
        """The slot's transfer is being released: bump its generation, then give the slot back."""
        if self._generations[slot] % 2 == 0:
            raise ValueError(f"lease slot {slot} is not taken")
        self._generations[slot] += 1
        self._free.append(slot)

    def close(self) -> None:
        """Unlink the file and unmap the table (idempotent)."""
        if self._map.closed:
            return
        self._generations.release()
        self._map.close()
        self.path.unlink(missing_ok=True)


class LeaseSlotsView:
    """A reader's read-only mapping of a same-host prefill's ``LeaseSlots``, unmapped when the view is freed
    (reads still running keep it)."""

    def __init__(self, name: str, directory: Path = SHM_DIR):
        """Map the table ``name`` (as the handshake gave it); ``ValueError`` for a name that is not one,
        ``OSError`` when it cannot be opened."""
        if not _NAME.match(name):
            raise ValueError(f"{name!r} does not name a lease table")
        with open(directory / name, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0 or size % SLOT_BYTES:
                raise ValueError(f"{name} holds {size} bytes, not a table of {SLOT_BYTES}-byte slots")
            self._map = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        self._generations = memoryview(self._map).cast("Q")

    def held(self, slot: int, generation: int) -> bool:
        """Whether the slot still holds the lease of that generation (a slot outside the table: no)."""
        return 0 <= slot < len(self._generations) and self._generations[slot] == generation
