"""``StepStats``: what the engine counts between two steps."""

from __future__ import annotations

from dataclasses import dataclass

from common.messages import Load


@dataclass
class StepStats:
    """The engine's counts between two steps (the wire ``EngineStats`` carries them as ``Load``)."""

    running: int
    waiting: int
    waiting_for_remote_kvs: int
    kv_blocks_used: int
    kv_blocks_pinned: int
    kv_blocks_total: int
    num_preemptions: int

    def to_load(self) -> Load:
        return Load(
            running=self.running,
            waiting=self.waiting + self.waiting_for_remote_kvs,
            kv_blocks_used=self.kv_blocks_used,
            kv_blocks_total=self.kv_blocks_total,
            kv_blocks_pinned=self.kv_blocks_pinned,
        )
