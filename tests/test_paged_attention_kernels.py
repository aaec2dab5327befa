"""The Triton paged-attention kernels against their PyTorch references, and the references against dense SDPA.

On CPU the kernels run under ``TRITON_INTERPRET=1``; shapes stay small.  Each case scatters per-sequence K/V
into shuffled, non-contiguous cache blocks of layer 1 of 2 (every other slot holds noise), with block tables
wider than needed, so reading a wrong block, layer, K/V plane or position shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from common.engine.kernels import paged_attention as pa  # noqa: E402

LAYER = 1
CONTEXTS = [1, 15, 16, 17, 100]
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3)}


@pytest.fixture(autouse=True)
def interpreter_loop_bounds(monkeypatch):
    """Triton 3.6's interpreter turns a loaded scalar into a Python int with ``int(array of shape (1,))``,
    which NumPy >= 2.4 refuses (triton-lang/triton#9171): loops bounded by a loaded length need ``.item()``."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patched)


@dataclass
class Batch:
    kv_data: torch.Tensor  # [blocks, kv_heads, block_size, 2 layers, 2, head_dim]
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    context_lens: torch.Tensor  # int32 [B]
    keys: list[torch.Tensor]  # per sequence [context_len, kv_heads, head_dim]
    values: list[torch.Tensor]


def slots_of(table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    return table[positions // block_size].long() * block_size + positions % block_size


def make_batch(
    context_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int, dtype=torch.float32, seed: int = 0
) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    needed = [math.ceil(c / block_size) for c in context_lens]
    num_blocks = sum(needed) + 3
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.randint(0, num_blocks, (len(context_lens), max(needed) + 2), generator=gen, dtype=torch.int32)
    start = 0
    for i, n in enumerate(needed):
        tables[i, :n] = order[start : start + n]
        start += n
    kv_data = torch.randn(num_blocks, num_kv_heads, block_size, 2, 2, head_dim, generator=gen).to(dtype)
    keys, values = [], []
    for i, c in enumerate(context_lens):
        k, v = (torch.randn(c, num_kv_heads, head_dim, generator=gen).to(dtype) for _ in range(2))
        pa.write_kv_reference(kv_data, LAYER, k, v, slots_of(tables[i], torch.arange(c), block_size))
        keys.append(k)
        values.append(v)
    return Batch(kv_data, tables, torch.tensor(context_lens, dtype=torch.int32), keys, values)


def queries(num_tokens: int, num_heads: int, head_dim: int, dtype=torch.float32, strided: bool = False):
    """``[N, H, D]``; ``strided``: a view into a wider packed QKV tensor, as the model produces."""
    gen = torch.Generator().manual_seed(1)
    if strided:
        return torch.randn(num_tokens, num_heads + 4, head_dim, generator=gen).to(dtype)[:, 2 : 2 + num_heads]
    return torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)


def start_loc(query_lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)


def dense_attention(q, batch: Batch, query_lens: list[int], scale: float, window: int | None) -> torch.Tensor:
    """SDPA per sequence on the dense K/V the batch was built from (float64)."""
    out, start = [], 0
    group = q.shape[1] // batch.keys[0].shape[1]
    for k, v, n in zip(batch.keys, batch.values, query_lens):
        c = k.shape[0]
        query_pos, key_pos = torch.arange(c - n, c)[:, None], torch.arange(c)[None, :]
        allowed = (key_pos <= query_pos) & (key_pos > query_pos - (window or c + 1))
        qs, ks, vs = (x.double().transpose(0, 1) for x in (q[start : start + n], k, v))
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        out.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scale).transpose(0, 1))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_write_kv_matches_reference(block_size, head_dim):
    batch = make_batch([17, 40], 3, head_dim, block_size)
    gen = torch.Generator().manual_seed(2)
    k, v = (torch.randn(9, 3 + 2, head_dim, generator=gen)[:, 1:4] for _ in range(2))  # strided views
    slots = torch.randperm(batch.kv_data.shape[0] * block_size, generator=gen)[:9]
    expected = batch.kv_data.clone()
    pa.write_kv_reference(expected, LAYER, k, v, slots)
    pa.write_kv(batch.kv_data, LAYER, k, v, slots)
    assert torch.equal(batch.kv_data, expected)


@pytest.mark.parametrize("window", [None, 1, 7, 40])
@pytest.mark.parametrize("group", [1, 4])
def test_references_agree_with_dense_sdpa(group, window):
    batch = make_batch(CONTEXTS, 2, 64, 16)
    query_lens = [1, 15, 3, 17, 37]
    q = queries(sum(query_lens), 2 * group, 64)
    args = (q, batch.kv_data, LAYER, batch.block_tables, start_loc(query_lens), batch.context_lens, 0.125, window)
    dense = dense_attention(q, batch, query_lens, 0.125, window).float()
    torch.testing.assert_close(pa.prefill_attention_reference(*args), dense, **TOL[torch.float32])
    q1 = queries(len(CONTEXTS), 2 * group, 64)
    args = (q1, batch.kv_data, LAYER, batch.block_tables, batch.context_lens, 0.125, window)
    dense = dense_attention(q1, batch, [1] * len(CONTEXTS), 0.125, window).float()
    torch.testing.assert_close(pa.decode_attention_reference(*args), dense, **TOL[torch.float32])


@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_decode_matches_reference(block_size, head_dim, group):
    batch = make_batch(CONTEXTS, 2, head_dim, block_size)
    q = queries(len(CONTEXTS), 2 * group, head_dim, strided=group == 2)
    args = (q, batch.kv_data, LAYER, batch.block_tables, batch.context_lens, head_dim**-0.5)
    # partitions of 32 keys in tiles of 16: several partitions and tiles per sequence
    out = pa.decode_attention(*args, partition_size=32, block_n=16)
    torch.testing.assert_close(out, pa.decode_attention_reference(*args), **TOL[torch.float32])


@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_prefill_matches_reference(block_size, head_dim, group):
    # mixed batch: whole prompts, single tokens, chunks after cached prefixes (prefix-cache hits)
    contexts, query_lens = [1, 15, 16, 17, 100, 40], [1, 15, 1, 17, 37, 23]
    batch = make_batch(contexts, 2, head_dim, block_size)
    q = queries(sum(query_lens), 2 * group, head_dim, strided=group == 2)
    args = (q, batch.kv_data, LAYER, batch.block_tables, start_loc(query_lens), batch.context_lens, head_dim**-0.5)
    out = pa.prefill_attention(*args, block_m=32, block_n=16)
    torch.testing.assert_close(out, pa.prefill_attention_reference(*args), **TOL[torch.float32])


@pytest.mark.parametrize("window", [1, 7, 16, 40])
def test_sliding_window(window):
    batch = make_batch(CONTEXTS, 2, 64, 16)
    q1 = queries(len(CONTEXTS), 4, 64)
    args = (q1, batch.kv_data, LAYER, batch.block_tables, batch.context_lens, 0.125, window)
    out = pa.decode_attention(*args, partition_size=32, block_n=16)
    torch.testing.assert_close(out, pa.decode_attention_reference(*args), **TOL[torch.float32])
    query_lens = [1, 15, 3, 17, 60]
    q = queries(sum(query_lens), 4, 64)
    args = (q, batch.kv_data, LAYER, batch.block_tables, start_loc(query_lens), batch.context_lens, 0.125, window)
    out = pa.prefill_attention(*args, block_m=16, block_n=16)
    torch.testing.assert_close(out, pa.prefill_attention_reference(*args), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16])
def test_half_precision_and_default_tiles(dtype):
    batch = make_batch(CONTEXTS, 2, 64, 16, dtype=dtype)
    q1 = queries(len(CONTEXTS), 8, 64, dtype)
    args = (q1, batch.kv_data, LAYER, batch.block_tables, batch.context_lens, 0.125)
    torch.testing.assert_close(pa.decode_attention(*args), pa.decode_attention_reference(*args), **TOL[dtype])
    query_lens = [1, 15, 3, 17, 100]
    q = queries(sum(query_lens), 8, 64, dtype)
    args = (q, batch.kv_data, LAYER, batch.block_tables, start_loc(query_lens), batch.context_lens, 0.125)
    torch.testing.assert_close(pa.prefill_attention(*args), pa.prefill_attention_reference(*args), **TOL[dtype])


def test_rejects_what_the_kernels_cannot_read():
    batch = make_batch([5], 2, 64, 16)
    q = queries(1, 6, 64)
    with pytest.raises(ValueError, match="query heads"):
        pa.decode_attention(q[:, :3], batch.kv_data, LAYER, batch.block_tables, batch.context_lens, 0.125)
    with pytest.raises(ValueError, match="layer"):
        pa.decode_attention(q[:, :4], batch.kv_data, 2, batch.block_tables, batch.context_lens, 0.125)
    with pytest.raises(ValueError, match="head_dim rows"):
        pa.write_kv(batch.kv_data.transpose(3, 5), LAYER, q[:, :2], q[:, :2], torch.zeros(1, dtype=torch.long))
