"""The paged KV cache: one tensor, block-major (see docs/architecture.md)."""

from __future__ import annotations

from collections.abc import Callable

import torch

Allocate = Callable[[tuple[int, ...], torch.dtype, torch.device | str], torch.Tensor]


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Private memory of the engine's device (the default KV allocation)."""
    return torch.zeros(shape, dtype=dtype, device=device)


class KVCache:
    """``data[num_blocks, num_layers, 2 (K, V), block_size, num_kv_heads, head_dim]``.

    Block ``b`` is the contiguous byte range ``[b * block_bytes, (b + 1) * block_bytes)``
    of ``data``: K and V of every layer for ``block_size`` token positions.
    """

    LAYOUT = "block-major"

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
        self.data = allocate((num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim), dtype, device)
        self.block_bytes = self.bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype)

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Bytes of one block (all layers, K and V): used to size the cache by a memory budget."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return num_layers * 2 * block_size * num_kv_heads * head_dim * itemsize

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of one layer: strided views ``[num_blocks, block_size, num_kv_heads, head_dim]``."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"KVCache: layer {layer} out of range [0, {self.num_layers})")
        return self.data[:, layer, 0], self.data[:, layer, 1]

    def block_view(self, block_id: int) -> torch.Tensor:
        """``data[block_id]``: one block, contiguous ``[num_layers, 2, block_size, num_kv_heads, head_dim]``."""
        if not 0 <= block_id < self.num_blocks:
            raise IndexError(f"KVCache: block {block_id} out of range [0, {self.num_blocks})")
        return self.data[block_id]
