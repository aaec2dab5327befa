"""Continuous batching with chunked prefill: one rule for prefill, decode, recompute and remote KV.

Each step a sequence computes the tokens ``[num_computed_tokens, len(token_ids))``
cut to the step's token budget; it samples only when that reaches the end.
Running sequences go first (oldest first); when blocks run out the newest
running sequence is preempted (its blocks freed, recomputed later).  Waiting
sequences are admitted only in steps without preemption.  Sequences in
``WAITING_FOR_REMOTE_KVS`` hold their blocks and are never scheduled until
``finish_remote_kv``.  With an offload tier, a fresh sequence's prefix hits
continue from host memory where the device's end.  Under async scheduling a running
sequence whose last token, still on the device, ends it is not scheduled again
(``Sequence.final_token_pending``).
"""

from __future__ import annotations

import logging
from collections import deque

from common.engine.block_manager import BlockManager
from common.engine.sequence import NoFreeBlocks, RemoteAllocation, Sequence, SequenceStatus
from common.kv_offload.tier import OffloadTier

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_batched_tokens: int, max_num_seqs: int,
                 offload: OffloadTier | None = None):
        self.block_manager = block_manager
        self.offload = offload
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.remote: dict[str, Sequence] = {}  # WAITING_FOR_REMOTE_KVS, by request id
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_schedulable(self) -> bool:
        return bool(self.waiting or self.running)

    def may_preempt(self) -> bool:
        """Whether ``schedule`` could preempt now: the running sequences' remaining tokens need more blocks
        than are free (an upper bound).  Async scheduling preempts only with no step in flight."""
        bm = self.block_manager
        need = sum(max(0, bm.blocks_for(seq.num_tokens) - len(seq.block_table)) for seq in self.running)
        return need > bm.num_free

    def schedule(self) -> list[tuple[Sequence, int]]:
        """Pick this step's sequences and how many new tokens each computes; grows their blocks."""
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.final_token_pending:
                i += 1
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.can_grow(seq, seq.num_computed_tokens + n):
                preempted = True
                victim = self.running.pop()
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                bm.grow(seq, seq.num_computed_tokens + n)
                scheduled.append((seq, n))
                budget -= n
                i += 1
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            fresh = not seq.block_table
            if fresh:  # new or preempted: take prefix-cache hits, always leaving one token to compute
                max_hit = (seq.num_tokens - 1) // bm.block_size
                hit = bm.allocate_prefix(seq, max_hit)
                if self.offload is not None:
                    hit += self.offload.load_prefix(seq, max_hit) * bm.block_size
                seq.num_computed_tokens = hit
                if seq.first_scheduled_time is None:
                    seq.num_cached_tokens = hit
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not bm.can_grow(seq, seq.num_computed_tokens + n):
                if fresh:
                    bm.free_seq(seq)
                    seq.num_computed_tokens = 0
                break
            bm.grow(seq, seq.num_computed_tokens + n)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
        return scheduled

    def update(self, scheduled: list[tuple[Sequence, int]]) -> None:
        """After the forward pass: advance ``num_computed_tokens`` and register newly full blocks
        (of sequences not finished meanwhile)."""
        for seq, n in scheduled:
            if seq.status is SequenceStatus.FINISHED:
                continue
            seq.num_computed_tokens += n
            self.block_manager.commit(seq)

    def finish(self, seq: Sequence, pin_blocks: int = 0, keep_blocks: bool = False) -> list[int]:
        """Remove a sequence and free its blocks (``keep_blocks``: a launched step still computes for it,
        and frees them, ``InflightStep.release``); its first ``pin_blocks`` blocks stay pinned under
        ``seq.pin_for_transfer``.  Returns the pinned block ids."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SequenceStatus.WAITING_FOR_REMOTE_KVS:
            del self.remote[seq.request_id]
        pinned: list[int] = []
        if pin_blocks and seq.pin_for_transfer is not None:
            pinned = seq.block_table[:pin_blocks]
            self.block_manager.pin(seq.pin_for_transfer, pinned)
        if not keep_blocks:
            self.block_manager.free_seq(seq)
        seq.status = SequenceStatus.FINISHED
        return pinned

    def add_remote(self, seq: Sequence) -> RemoteAllocation:
        """Allocate blocks for the prompt plus its first token; prefix hits lead.  Raises ``NoFreeBlocks``."""
        bm = self.block_manager
        hit = bm.allocate_prefix(seq, seq.num_prompt_tokens // bm.block_size)
        if not bm.can_grow(seq, seq.num_prompt_tokens + 1):
            bm.free_seq(seq)
            raise NoFreeBlocks(
                f"request {seq.request_id}: needs {bm.blocks_for(seq.num_prompt_tokens + 1) - len(seq.block_table)} "
                f"free KV blocks, {bm.num_free} free"
            )
        bm.grow(seq, seq.num_prompt_tokens + 1)
        seq.num_cached_tokens = hit
        seq.status = SequenceStatus.WAITING_FOR_REMOTE_KVS
        self.remote[seq.request_id] = seq
        return RemoteAllocation(block_ids=list(seq.block_table), num_cached_blocks=hit // bm.block_size)

    def finish_remote(self, seq: Sequence, kv_valid: bool, first_token_id: int) -> None:
        """KV of the prompt has landed (``kv_valid``) or must be recomputed past the prefix hits;
        the first token is appended and the sequence queues at the front.  Its landed blocks become cache
        hits when the step that first computes for it is launched (``update``): hashing a long prompt
        (~0.35 ms for 2,048 tokens) would otherwise delay that step."""
        del self.remote[seq.request_id]
        seq.num_computed_tokens = seq.num_prompt_tokens if kv_valid else seq.num_cached_tokens
        seq.token_ids.append(first_token_id)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _preempt(self, seq: Sequence) -> None:
        logger.debug("preempting request %s (%d tokens)", seq.request_id, seq.num_tokens)
        self.num_preemptions += 1
        self.block_manager.free_seq(seq)
        seq.num_computed_tokens = seq.num_pushed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
