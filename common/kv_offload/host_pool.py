"""``HostPool``: which host-memory slot holds which prefix-cache block, least recently used first.

The bookkeeping only (rank 0, the engine thread); the bytes live in each rank's
``HostCopier``.  An entry is keyed by its block hash (the whole prefix, see
``common.engine.block_manager``) and keeps the block's token ids, so a hash
collision is never a hit.  A slot is *reserved* while its copy from device
memory runs and becomes a hit only once ``mark_ready`` says the copy finished;
a reserved slot is never evicted, so no copy ever writes into a slot being read.
"""

from __future__ import annotations

from collections import OrderedDict


class HostPool:
    def __init__(self, num_slots: int):
        if num_slots <= 0:
            raise ValueError(f"HostPool: num_slots must be > 0, got {num_slots}")
        self.num_slots = num_slots
        self.entries: OrderedDict[int, tuple[int, tuple[int, ...]]] = OrderedDict()  # hash -> (slot, token ids)
        self.reserved: set[int] = set()  # slots whose copy in has not finished
        self.unused = list(range(num_slots - 1, -1, -1))

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self.entries

    def lookup(self, block_hash: int, token_ids: tuple[int, ...]) -> int | None:
        """The slot holding this block (now the most recently used), or None: absent, still being
        copied in, or another block under the same hash."""
        entry = self.entries.get(block_hash)
        if entry is None or entry[0] in self.reserved or entry[1] != token_ids:
            return None
        self.entries.move_to_end(block_hash)
        return entry[0]

    def reserve(self, block_hash: int, token_ids: tuple[int, ...]) -> int | None:
        """A slot to copy this block into, evicting the least recently used ready entry when full;
        None when the hash is already here or every slot is still being copied into."""
        if block_hash in self.entries:
            return None
        if self.unused:
            slot = self.unused.pop()
        else:
            victim = next((h for h, (s, _) in self.entries.items() if s not in self.reserved), None)
            if victim is None:
                return None
            slot = self.entries.pop(victim)[0]
        self.entries[block_hash] = (slot, token_ids)
        self.reserved.add(slot)
        return slot

    def mark_ready(self, slots: list[int]) -> None:
        """These slots' copies finished: their entries are hits from now on."""
        self.reserved.difference_update(slots)
