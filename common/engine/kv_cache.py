"""The paged KV cache: one tensor, head-major within each block (see docs/architecture.md)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from common.arith import ceil_div
from common.config import require
from common.engine.config import EngineConfig, parse_size
from common.engine.model_config import ModelConfig

CPU_KV_CACHE_BYTES = 512 << 20  # KV budget on CPU when neither --num-kv-blocks nor --kv-cache-memory is set

Allocate = Callable[[tuple[int, ...], torch.dtype, torch.device | str], torch.Tensor]


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Private memory of the engine's device (the default KV allocation)."""
    return torch.zeros(shape, dtype=dtype, device=device)


class KVCache:
    """``data[num_blocks, num_kv_heads, block_size, num_layers, 2 (K, V), head_dim]``.

    Block ``b`` is the contiguous byte range ``[b * block_bytes, (b + 1) * block_bytes)``
    of ``data``: K and V of every layer for ``block_size`` token positions.  Inside it, the
    heads ``[h0, h1)`` (a TP rank's slice) are one contiguous range, and so is a run of
    token positions of one head (every layer, K and V).
    """

    LAYOUT = "head-major"

    def __init__(
        self,
        num_blocks: int,
        num_layers: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        allocate: Allocate = zeros,
    ):
        """``allocate(shape, dtype, device)`` returns the zeroed tensor (e.g. in a shared-memory file)."""
        for name, value in (
            ("num_blocks", num_blocks),
            ("num_layers", num_layers),
            ("block_size", block_size),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVCache: {name} must be a positive int, got {value!r}")
        self.num_blocks = num_blocks
        self.num_layers = num_layers
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.data = allocate((num_blocks, num_kv_heads, block_size, num_layers, 2, head_dim), dtype, device)
        self.block_bytes = self.bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype)

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Bytes of one block (all layers, K and V): used to size the cache by a memory budget."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return num_layers * 2 * block_size * num_kv_heads * head_dim * itemsize

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of one layer: strided views ``[num_blocks, num_kv_heads, block_size, head_dim]``.

        Each row of ``head_dim`` elements is contiguous and ``view(-1, head_dim)`` of either is a view (not a
        copy), whose rows ``plane_rows`` numbers: what attention writes and gathers.
        """
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"KVCache: layer {layer} out of range [0, {self.num_layers})")
        return self.data[:, :, :, layer, 0], self.data[:, :, :, layer, 1]

    def plane_rows(self, slots: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """Row of (slot, head) in ``layer(l)[kv].view(-1, head_dim)`` (the two broadcast), where slot
        ``block_id * block_size + offset`` is a token position in the cache."""
        return (slots // self.block_size * self.num_kv_heads + heads) * self.block_size + slots % self.block_size

    def block_view(self, block_id: int) -> torch.Tensor:
        """``data[block_id]``: one block, contiguous ``[num_kv_heads, block_size, num_layers, 2, head_dim]``."""
        if not 0 <= block_id < self.num_blocks:
            raise IndexError(f"KVCache: block {block_id} out of range [0, {self.num_blocks})")
        return self.data[block_id]


def num_kv_blocks(
    config: EngineConfig, mc: ModelConfig, num_kv_heads: int, dtype: torch.dtype, device: torch.device,
    max_model_len: int,
) -> int:
    """``--num-kv-blocks``, else the memory budget over bytes per block (of a rank holding ``num_kv_heads``),
    capped at what ``max_num_seqs`` full-length sequences can use."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    block_bytes = KVCache.bytes_per_block(mc.num_layers, config.block_size, num_kv_heads, mc.head_dim, dtype)
    if config.kv_cache_memory is not None:
        budget = parse_size(config.kv_cache_memory)
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * config.gpu_memory_utilization)
    else:
        budget = CPU_KV_CACHE_BYTES
    cap = config.max_num_seqs * ceil_div(max_model_len, config.block_size)
    num_blocks = min(budget // block_bytes, cap)
    require(num_blocks > 0, "kv_cache_memory", f"budget {budget} bytes holds no block of {block_bytes} bytes")
    return num_blocks
