"""Tensor parallelism inside one engine instance: this rank's place in the group and its collectives.

An instance of TP size N is N rank processes.  Rank 0 runs the engine (scheduler, block
manager, sampler); every rank holds a 1/N slice of each attention and MLP weight and runs
the forward for every step (see docs/architecture.md, "Tensor parallelism").

Two process groups join the ranks: the model group (NCCL on CUDA, gloo on CPU) carries the
all-reduces of the forward and times out after ``--tensor-parallel-timeout-s``; the control
group (gloo, CPU tensors) carries rank 0's step inputs to the workers, whose wait for the next
step is unbounded (an idle engine sends nothing; a worker leaves when rank 0 dies).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from common.arith import ceil_div
from common.config import require
from common.engine.model_config import ModelConfig
from common.errors import PdserveError

CONTROL_WAIT = timedelta(days=3650)  # a worker waits this long for rank 0's next step
# Loading a shard can take minutes on a busy host, far longer than a step may: the start-up barrier waits
# this long at least (a rank that dies meanwhile fails it at once: gloo sees its connection close).
START_WAIT = timedelta(minutes=5)
Matmul = Callable[..., torch.Tensor]  # F.linear(x, weight, bias=None) or a kernel of its signature
_STOP, _STEP = 0, 1


class TensorParallelError(PdserveError):
    """A tensor-parallel rank exited, or a collective failed or timed out: the instance cannot compute."""


@dataclass(frozen=True)
class Shard:
    """This rank's slice ``[start, start + size)`` along ``dim`` of a checkpoint tensor ``full`` long there."""

    dim: int
    start: int
    size: int
    full: int


def check_tensor_parallel(config: ModelConfig, size: int) -> None:
    """Refuse (``ConfigError``) a TP size the model's heads or MLP cannot be split into."""
    field = "tensor_parallel_size"
    require(
        config.num_heads % size == 0, field,
        f"{size} does not divide the model's num_attention_heads {config.num_heads}",
    )  # fmt: skip
    kv = config.num_kv_heads
    require(
        kv % size == 0 or size % kv == 0, field,
        f"{size} and the model's num_key_value_heads {kv}: neither divides the other",
    )  # fmt: skip
    require(
        config.intermediate_size % size == 0, field,
        f"{size} does not divide the model's intermediate_size {config.intermediate_size}",
    )  # fmt: skip
    require(
        (size - 1) * ceil_div(config.vocab_size, size) < config.vocab_size, field,
        f"{size} ranks leave one without vocabulary rows (vocab_size {config.vocab_size})",
    )  # fmt: skip


class TensorParallel:
    """Rank ``rank`` of ``world_size``; with ``world_size`` 1 (``SINGLE``) there are no groups and no collectives."""

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        model_group: dist.ProcessGroup | None = None,
        control_group: dist.ProcessGroup | None = None,
        timeout: timedelta | None = None,
        start_group: dist.ProcessGroup | None = None,
    ):
        self.rank = rank
        self.world_size = world_size
        self.model_group = model_group
        self.control_group = control_group
        self.start_group = start_group  # gloo, waits START_WAIT at least: the start-up barrier
        self.timeout = timeout  # of rank 0's sends and of every model-group collective

    @staticmethod
    def rendezvous(rank: int, world_size: int, port: int, timeout_s: float) -> dist.TCPStore:
        """The group's store on 127.0.0.1: rank 0 hosts it (``port`` 0: any free port, see ``.port``),
        the others connect to rank 0's ``port``."""
        try:
            return dist.TCPStore("127.0.0.1", port, world_size, is_master=rank == 0,
                                 timeout=timedelta(seconds=timeout_s), wait_for_workers=False)  # fmt: skip
        except (RuntimeError, ValueError) as e:
            raise TensorParallelError(f"rank {rank}: no tensor-parallel rendezvous on port {port}: {e}") from e

    @classmethod
    def join(
        cls, rank: int, world_size: int, store: dist.Store, device: torch.device, timeout_s: float
    ) -> "TensorParallel":
        """Join the group of ``store`` (``rendezvous``) from ``device`` (on CUDA the current device already);
        blocks until every rank joined or ``timeout_s`` passed."""
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        try:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
            control = dist.new_group(backend="gloo", timeout=CONTROL_WAIT)
            start = dist.new_group(backend="gloo", timeout=max(timeout, START_WAIT))
        except (RuntimeError, ValueError) as e:
            raise TensorParallelError(f"rank {rank}: joining the tensor-parallel group failed: {e}") from e
        return cls(rank, world_size, dist.group.WORLD, control, timeout, start)

    def leave(self) -> None:
        """Destroy the process groups (this process may then join another)."""
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ sharding

    def split(self, total: int) -> tuple[int, int]:
        """(start, size) of this rank's equal part of ``total``."""
        size = total // self.world_size
        return self.rank * size, size

    def vocab_rows(self, vocab_size: int) -> tuple[int, int]:
        """(start, size) of this rank's vocabulary rows: ``ceil(vocab / N)`` each, the last rank the rest."""
        part = ceil_div(vocab_size, self.world_size)
        start = self.rank * part
        return start, min(part, vocab_size - start)

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """(first, count) of this rank's KV heads: a 1/N part, or one head shared by N / num_kv_heads
        ranks when N > num_kv_heads (the head of this rank's query heads)."""
        if num_kv_heads >= self.world_size:
            return self.split(num_kv_heads)
        return self.rank * num_kv_heads // self.world_size, 1

    # ------------------------------------------------------------------ collectives

    def embed(self, embedding: nn.Embedding, ids: torch.Tensor, vocab_start: int) -> torch.Tensor:
        """A vocab-parallel lookup: this rank holds rows ``[vocab_start, vocab_start + rows)``, zeros the
        other ids' rows, and the sum over the ranks completes every row."""
        if self.world_size == 1:
            return embedding(ids)
        local = ids - vocab_start
        outside = (local < 0) | (local >= embedding.num_embeddings)
        out = embedding(local.masked_fill(outside, 0)).masked_fill_(outside.unsqueeze(-1), 0)
        dist.all_reduce(out, group=self.model_group)
        return out

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Every rank's logits ``[M, its vocab rows]`` joined into ``[M, vocab_size]`` (on every rank)."""
        part = ceil_div(vocab_size, self.world_size)
        padded = F.pad(logits, (0, part - logits.shape[-1]))
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.model_group)
        return torch.cat(parts, dim=-1)[:, :vocab_size]

    def row_linear(self, linear: nn.Linear, x: torch.Tensor, matmul: Matmul = F.linear) -> torch.Tensor:
        """A row-parallel linear: each rank's partial product (``matmul``, ``F.linear``'s signature) summed
        over the ranks, then the (replicated) bias."""
        if self.world_size == 1:
            return matmul(x, linear.weight, linear.bias)
        out = matmul(x, linear.weight)
        dist.all_reduce(out, group=self.model_group)
        return out if linear.bias is None else out + linear.bias

    def agree_min(self, value: int) -> int:
        """The smallest ``value`` over the ranks: the start-up barrier, once every rank loaded its shard
        (``TensorParallelError`` when a rank does not get there within ``START_WAIT``, or dies)."""
        tensor = torch.tensor([value], dtype=torch.int64)
        try:
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.start_group)
        except RuntimeError as e:
            raise TensorParallelError(f"rank {self.rank}: the ranks did not all start: {e}") from e
        return int(tensor.item())

    def send(self, values: list[int]) -> None:
        """Rank 0: broadcast one message of ints to the workers (``receive`` returns it there)."""
        self._send_header(_STEP, len(values))
        self._broadcast_bounded(torch.tensor(values, dtype=torch.int64))

    def send_stop(self) -> None:
        """Rank 0: tell the workers to leave (``receive`` returns None there)."""
        self._send_header(_STOP, 0)

    def receive(self) -> list[int] | None:
        """Worker: the next message of rank 0's ``send``, or None on ``send_stop``."""
        header = torch.zeros(2, dtype=torch.int64)
        dist.broadcast(header, 0, group=self.control_group)
        op, length = header.tolist()
        if op == _STOP:
            return None
        payload = torch.empty(length, dtype=torch.int64)
        dist.broadcast(payload, 0, group=self.control_group)
        return payload.tolist()

    def barrier(self) -> None:
        """Every rank got here (bounded by ``timeout`` like a control broadcast)."""
        dist.barrier(group=self.control_group, async_op=True).wait(self.timeout)

    def _send_header(self, op: int, length: int) -> None:
        self._broadcast_bounded(torch.tensor([op, length], dtype=torch.int64))

    def _broadcast_bounded(self, tensor: torch.Tensor) -> None:
        """Rank 0's side of a control broadcast, which waits for every worker: bounded by ``timeout``
        (gloo's ``wait`` raises ``RuntimeError`` past it, which the caller turns into a failed group)."""
        dist.broadcast(tensor, 0, group=self.control_group, async_op=True).wait(self.timeout)


SINGLE = TensorParallel()
