"""The fused decode kernel (``decode_attention.rotary_decode_attention``: rotary, the new token's K/V write and
split-K attention in one launch) against the unfused kernels it replaces (``rotary.apply_rotary_write_kv_`` then
``decode_attention``: the same output and cache bit for bit, in Triton's interpreter and compiled) and against its
PyTorch reference.

Caches, block tables and contexts as ``test_paged_attention_kernels`` builds them (shuffled blocks of layer 1 of
2, noise elsewhere); each sequence's new token is its last position, its q/k/v rows views of one packed qkv
tensor as the model produces them.  On CPU the kernels run in Triton's interpreter (float32/16 only).
"""

from __future__ import annotations

import pytest
import torch

from common.engine.kernels import decode_attention as da
from common.engine.kernels import rotary
from common.engine.model import RotaryEmbedding
from tests.test_paged_attention_kernels import DEVICE, HALF, LAYER, TOL, kernels, make_batch, slots_of

CONTEXTS = [1, 15, 16, 17, 33, 100]  # crossing blocks of 16 and partitions of 32


def rope_table(head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    rope = RotaryEmbedding(head_dim, 10000.0, None, 256)
    rope.build_table(DEVICE, dtype)
    return rope.table


def step(batch, heads: int, padding: int = 0, seed: int = 5) -> tuple:
    """``(q, k, v, positions, slot_mapping, block_tables, context_lens, source_rows)`` of a decode step over
    ``batch`` (views of one qkv tensor); ``padding`` extra rows repeat row 0 as CUDA-graph padding does, their
    own q/k/v rows junk, ``source_rows`` then pointing them at row 0."""
    tables, lens = batch.block_tables, batch.context_lens
    if padding:
        tables = torch.cat([tables, tables[:1].expand(padding, -1)])
        lens = torch.cat([lens, lens[:1].expand(padding)])
    n, kv_heads, head_dim = len(lens), batch.kv_data.shape[1], batch.kv_data.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, generator=gen).to(DEVICE, batch.kv_data.dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=1)
    q, k, v = q.view(n, heads, head_dim), k.view(n, kv_heads, head_dim), v.view(n, kv_heads, head_dim)
    positions = lens.long() - 1
    slots = torch.stack([slots_of(tables[i], positions[i : i + 1], batch.kv_data.shape[2])[0] for i in range(n)])
    source = torch.cat([torch.arange(n - padding), torch.zeros(padding, dtype=torch.long)]).to(DEVICE)
    return q, k, v, positions, slots, tables, lens, source if padding else None


def check(batch, heads: int, window: int | None = None, padding: int = 0, **tiles) -> torch.Tensor:
    """Fused == unfused (output and cache), output close to the reference and cache equal to it; q and k
    untouched.  Returns the output."""
    q, k, v, positions, slots, tables, lens, source = step(batch, heads, padding)
    table, scale = rope_table(q.shape[-1], q.dtype), q.shape[-1] ** -0.5
    q_before, k_before = q.clone(), k.clone()
    fused_cache, unfused_cache, expected_cache = (batch.kv_data.clone() for _ in range(3))
    out = da.rotary_decode_attention(q, k, v, positions, table, fused_cache, LAYER, slots, tables, lens, scale, window,
                                     source, **tiles)  # fmt: skip
    assert torch.equal(q, q_before) and torch.equal(k, k_before)
    rotated = q.clone()
    rotary.apply_rotary_write_kv_(rotated, k, v, positions, table, unfused_cache, LAYER, slots, source)
    unfused = da.decode_attention(rotated, unfused_cache, LAYER, tables, lens, scale, window, **tiles)
    expected = da.rotary_decode_attention_reference(q, k, v, positions, table, expected_cache, LAYER, slots, tables,
                                                     lens, scale, window, source)  # fmt: skip
    assert torch.equal(out, unfused) and torch.equal(fused_cache, unfused_cache)
    torch.testing.assert_close(out, expected, **TOL[q.dtype])
    assert torch.equal(fused_cache, expected_cache)  # K rotated as the reference rotates it
    return out


@kernels
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 32])
def test_fused_is_rotary_write_then_attention(block_size, head_dim, group):
    num_kv_heads = 2 if group <= 2 else 1  # (a small head count keeps the interpreter quick)
    batch = make_batch(CONTEXTS, num_kv_heads, head_dim, block_size)
    check(batch, num_kv_heads * group, partition_size=32, block_n=16)  # several partitions and tiles per sequence


@kernels
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("group", [4, 3])
def test_fused_rounds_as_the_unfused_kernels(dtype, group):
    """16-bit: q and K rotated to the dtype as rotary stores them, then attention; default partitions."""
    check(make_batch(CONTEXTS, 2, 64, 16, dtype=dtype), 2 * group)


@kernels
@pytest.mark.parametrize("window", [1, 7, 40])
def test_fused_sliding_window(window):
    check(make_batch(CONTEXTS, 2, 64, 16), 8, window, partition_size=32, block_n=16)


@kernels
@pytest.mark.parametrize("partition_size", [32, 256])
def test_padded_rows_rewrite_row_0_and_change_nothing_else(partition_size):
    """CUDA-graph padding: rows 6-8 repeat row 0 (context, blocks, slot, position) with junk q/k/v of their own;
    each writes row 0's K/V (``source_rows``) to row 0's slot, and the real rows' outputs are those of the
    unpadded step (one partition: the reduce is skipped; 32 keys: several)."""
    batch = make_batch(CONTEXTS, 2, 64, 16)
    padded = check(batch, 8, padding=3, partition_size=partition_size, block_n=16)
    q, k, v, positions, slots, tables, lens, _ = step(batch, 8)
    table = rope_table(64, q.dtype)
    alone = da.rotary_decode_attention(q, k, v, positions, table, batch.kv_data.clone(), LAYER, slots, tables, lens,
                                       0.125, partition_size=partition_size, block_n=16)  # fmt: skip
    assert torch.equal(padded[: len(CONTEXTS)], alone)


@kernels
def test_int64_metadata_and_a_single_partition_without_the_reduce(monkeypatch):
    batch = make_batch([1, 70, 100], 2, 64, 16)  # tables of 9 blocks: one 256-key partition
    batch.block_tables, batch.context_lens = batch.block_tables.long(), batch.context_lens.long()
    monkeypatch.setattr(da, "_decode_reduce_kernel", None)  # launching it would raise
    check(batch, 8, 30, partition_size=256)


@kernels
def test_head_dim_not_a_power_of_two():
    """Head dim 80 pads to 128 lanes; lane d still pairs with d +- 40."""
    check(make_batch(CONTEXTS, 2, 80, 16), 6, partition_size=32, block_n=16)


@kernels
def test_rejects_mismatched_rows():
    batch = make_batch([5, 9], 2, 64, 16)
    q, k, v, positions, slots, tables, lens, _ = step(batch, 4)
    table = rope_table(64, q.dtype)
    with pytest.raises(ValueError, match="slot_mapping"):
        da.rotary_decode_attention(q, k, v, positions, table, batch.kv_data, LAYER, slots[:1], tables, lens, 0.1)
    with pytest.raises(ValueError, match="positions"):
        da.rotary_decode_attention(q, k, v, positions[:1], table, batch.kv_data, LAYER, slots, tables, lens, 0.1)
    with pytest.raises(ValueError, match=r"v \(2, 1, 64\)"):
        da.rotary_decode_attention(q, k, v[:, :1], positions, table, batch.kv_data, LAYER, slots, tables, lens, 0.1)
