"""Turns one scheduled step into a forward pass over the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from common.engine.attention import AttentionMetadata
from common.engine.cuda_graph import DecodeGraphs
from common.engine.host_copies import to_device, to_device_aligned
from common.engine.inflight_step import fill_pending
from common.engine.kv_cache import KVCache
from common.engine.model import CausalLM
from common.engine.parallel import SINGLE, TensorParallel
from common.engine.sequence import Sequence
from common.kv_offload.host_copier import HostCopier
from common.kv_offload.tier import OffloadOps


@dataclass
class StepInputs:
    """What every rank needs to run one step's forward: the new tokens (flattened), their positions,
    and per sequence its new-token count, context length after the step, block table and whether
    its last token's logits are wanted; and the step's offload copies, ``(host slot, device block)``."""

    input_ids: list[int]
    positions: list[int]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    sample: list[bool]
    offload: OffloadOps = field(default_factory=OffloadOps)

    @classmethod
    def of(cls, scheduled: list[tuple[Sequence, int]], sample: list[bool], offload: OffloadOps | None = None
           ) -> "StepInputs":
        """Each sequence computes ``n`` tokens from its ``num_computed_tokens`` on."""
        inputs = cls([], [], [], [], [seq.block_table for seq, _ in scheduled], sample, offload or OffloadOps())
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            inputs.input_ids += seq.token_ids[start : start + n]
            inputs.positions += range(start, start + n)
            inputs.query_lens.append(n)
            inputs.context_lens.append(start + n)
        return inputs

    def pack(self) -> list[int]:
        """One flat list of ints (``unpack`` inverts it): how rank 0 broadcasts a step."""
        loads, stores = self.offload.loads, self.offload.stores
        header = [len(self.query_lens), len(self.input_ids), len(loads), len(stores)]
        per_seq = self.query_lens + self.context_lens + [int(s) for s in self.sample]
        tables = [len(t) for t in self.block_tables] + [b for t in self.block_tables for b in t]
        copies = [x for pair in loads + stores for x in pair]
        return header + self.input_ids + self.positions + per_seq + copies + tables

    @classmethod
    def unpack(cls, values: list[int]) -> "StepInputs":
        num_seqs, num_tokens, num_loads, num_stores = values[:4]
        parts, at = [], 4
        for length in (num_tokens, num_tokens, num_seqs, num_seqs, num_seqs, 2 * num_loads, 2 * num_stores, num_seqs):
            parts.append(values[at : at + length])
            at += length
        input_ids, positions, query_lens, context_lens, sample, loads, stores, table_lens = parts
        tables = []
        for length in table_lens:
            tables.append(values[at : at + length])
            at += length
        offload = OffloadOps(list(zip(loads[::2], loads[1::2])), list(zip(stores[::2], stores[1::2])))
        return cls(input_ids, positions, query_lens, context_lens, tables, [bool(s) for s in sample], offload)


class ModelRunner:
    """Runs steps eagerly, except decode-only batches on CUDA, which replay ``DecodeGraphs``
    (unless ``enforce_eager``, or under tensor parallelism, which always runs eagerly).  The model's
    ``attention_backend`` decides whether a mixed batch's metadata is split into decode and prefill
    ``parts`` (torch) or attended in one call (triton).

    Under tensor parallelism rank 0 calls ``run``, which broadcasts the step's inputs; every
    other rank calls ``forward`` with the inputs it receives (``TensorParallel.receive``), so that
    all ranks run the same collectives.

    With ``offload`` (a ``HostCopier``) every step first waits for the previous step's copies out,
    then copies its loads in and starts its stores, then runs the forward pass; a step with no
    sequences only copies (under tensor parallelism it ends with a barrier, as a forward pass's
    collectives would: once rank 0 returns, every rank finished the previous stores).

    Async scheduling: an input id may be a placeholder of the step still in flight (``InflightStep``);
    ``run`` takes it from that step's sampled ids ``pending`` on the device (tensor parallelism never
    sees one: it steps synchronously).  Nothing here waits for the device.
    """

    def __init__(
        self,
        model: CausalLM,
        kv_cache: KVCache,
        device: torch.device,
        max_num_seqs: int,
        max_model_len: int,
        enforce_eager: bool = False,
        tp: TensorParallel = SINGLE,
        offload: HostCopier | None = None,
    ):
        self.model = model
        self.offload = offload
        self.kv_cache = kv_cache
        self.device = device
        self.tp = tp
        use_graphs = device.type == "cuda" and not enforce_eager and tp.world_size == 1
        self.graphs = DecodeGraphs(model, kv_cache, max_num_seqs, max_model_len) if use_graphs else None

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]], sample: list[bool], offload: OffloadOps | None = None,
            pending: torch.Tensor | None = None) -> torch.Tensor | None:
        """Compute each sequence's ``n`` tokens from ``num_computed_tokens`` on (writing their KV);
        returns float32 logits of the last token of every sequence with ``sample`` set (None if none)."""
        return self.execute(StepInputs.of(scheduled, sample, offload), pending)

    def execute(self, inputs: StepInputs, pending: torch.Tensor | None = None) -> torch.Tensor | None:
        """``forward`` on every rank: rank 0 broadcasts ``inputs`` first under tensor parallelism."""
        if self.tp.world_size > 1:
            self.tp.send(inputs.pack())
        return self.forward(inputs, pending)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def forward(self, inputs: StepInputs, pending: torch.Tensor | None = None) -> torch.Tensor | None:
        """Run the step (placeholder input ids taken from ``pending``); float32 logits of the last token
        of every sequence with ``sample`` set (None if none)."""
        if self.offload is not None:
            self.offload.wait_stores()
            self.offload.load(inputs.offload.loads)
            self.offload.store(inputs.offload.stores)
        if not inputs.query_lens:
            if self.tp.world_size > 1:
                self.tp.barrier()
            return None
        if pending is not None and min(inputs.input_ids) >= 0:
            pending = None
        hidden, last = self._hidden_states(inputs, pending)
        if not any(inputs.sample):
            return None
        if not all(inputs.sample):
            rows = to_device([i for i, s in enumerate(inputs.sample) if s], torch.int64, self.device)
            last = rows if last is None else last[rows]
        return self.model.compute_logits(hidden if last is None else hidden[last])

    def _hidden_states(self, inputs: StepInputs, pending: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states of every new token, the row of each sequence's last new token; None: row i is
        sequence i's, a decode batch)."""
        num_seqs = len(inputs.query_lens)
        decode_only = len(inputs.input_ids) == num_seqs
        if decode_only and self.graphs is not None and self.graphs.bucket(num_seqs, max(inputs.context_lens)):
            return self.graphs.run(inputs.input_ids, inputs.positions, inputs.block_tables, pending), None
        meta = AttentionMetadata.build(
            inputs.query_lens, inputs.context_lens, inputs.block_tables, self.kv_cache.block_size, self.device,
            split_parts=self.model.attention_backend == "torch",
        )
        ids, positions = to_device_aligned([inputs.input_ids, inputs.positions], torch.int64, self.device)
        if pending is not None:
            fill_pending(ids, pending)
        hidden = self.model(ids, positions, meta, self.kv_cache)
        return hidden, meta.query_start_loc[1:] - 1
