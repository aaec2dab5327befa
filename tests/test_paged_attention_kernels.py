"""The Triton paged-attention kernels against their PyTorch references, and the references against dense SDPA.

The kernels run on CUDA, or on CPU under ``TRITON_INTERPRET=1`` (float32/16 only: the interpreter gets
bfloat16 wrong); shapes stay small.  Each case scatters per-sequence K/V into shuffled, non-contiguous cache
blocks of layer 1 of 2 (every other slot holds noise), with block tables wider than needed, so reading a wrong
block, layer, K/V plane or position shows.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common.engine.kernels import decode_attention as da
from common.engine.kernels import paged_attention as pa
from common.engine.kernels import paged_attention_reference as ref
from common.engine.kernels import rotary, sampling

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
kernels = pytest.mark.skipif(
    not pa.available() or (DEVICE == "cpu" and not INTERPRET), reason="needs triton, and CUDA or TRITON_INTERPRET=1"
)
LAYER = 1
CONTEXTS = [1, 15, 16, 17, 100]
TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
HALF = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


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
    kv_data = torch.randn(num_blocks, num_kv_heads, block_size, 2, 2, head_dim, generator=gen).to(DEVICE, dtype)
    keys, values = [], []
    for i, c in enumerate(context_lens):
        k, v = (torch.randn(c, num_kv_heads, head_dim, generator=gen).to(DEVICE, dtype) for _ in range(2))
        ref.write_kv_reference(kv_data, LAYER, k, v, slots_of(tables[i], torch.arange(c), block_size).to(DEVICE))
        keys.append(k)
        values.append(v)
    context_lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    return Batch(kv_data, tables.to(DEVICE), context_lens, keys, values)


def queries(num_tokens: int, num_heads: int, head_dim: int, dtype=torch.float32, strided: bool = False):
    """``[N, H, D]``; ``strided``: a view into a wider packed QKV tensor, as the model produces."""
    gen = torch.Generator().manual_seed(1)
    if strided:
        return torch.randn(num_tokens, num_heads + 4, head_dim, generator=gen).to(DEVICE, dtype)[:, 2 : 2 + num_heads]
    return torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(DEVICE, dtype)


def start_loc(query_lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def dense_attention(q, batch: Batch, query_lens: list[int], scale: float, window: int | None) -> torch.Tensor:
    """SDPA per sequence on the dense K/V the batch was built from (float64)."""
    out, start = [], 0
    group = q.shape[1] // batch.keys[0].shape[1]
    for k, v, n in zip(batch.keys, batch.values, query_lens):
        c = k.shape[0]
        query_pos, key_pos = torch.arange(c - n, c, device=DEVICE)[:, None], torch.arange(c, device=DEVICE)[None, :]
        allowed = (key_pos <= query_pos) & (key_pos > query_pos - (window or c + 1))
        qs, ks, vs = (x.double().transpose(0, 1) for x in (q[start : start + n], k, v))
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        out.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scale).transpose(0, 1))
        start += n
    return torch.cat(out)


@kernels
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_write_kv_matches_reference(block_size, head_dim):
    batch = make_batch([17, 40], 3, head_dim, block_size)
    gen = torch.Generator().manual_seed(2)
    k, v = (torch.randn(9, 3 + 2, head_dim, generator=gen).to(DEVICE)[:, 1:4] for _ in range(2))  # strided views
    slots = torch.randperm(batch.kv_data.shape[0] * block_size, generator=gen)[:9].to(DEVICE)
    expected = batch.kv_data.clone()
    ref.write_kv_reference(expected, LAYER, k, v, slots)
    pa.write_kv(batch.kv_data, LAYER, k, v, slots)
    assert torch.equal(batch.kv_data, expected)


@kernels
@pytest.mark.parametrize("block_size", [8, 16])
def test_write_kv_takes_source_rows_as_cuda_graph_padding_does(block_size):
    """Padded rows repeat row 0: slot i of the padding gets row source_rows[i]'s K/V, read in place."""
    batch = make_batch([17, 40], 2, 64, block_size)
    gen = torch.Generator().manual_seed(3)
    k, v = (torch.randn(6, 2, 64, generator=gen).to(DEVICE) for _ in range(2))
    source = torch.tensor([0, 1, 2, 3, 0, 0], device=DEVICE)
    slots = torch.tensor([5, 9, 30, 31, 5, 5], device=DEVICE)  # padding writes row 0's K/V to row 0's slot
    expected = batch.kv_data.clone()
    ref.write_kv_reference(expected, LAYER, k, v, slots, source)
    pa.write_kv(batch.kv_data, LAYER, k, v, slots, source)
    assert torch.equal(batch.kv_data, expected)
    gathered = batch.kv_data.clone()
    ref.write_kv_reference(gathered, LAYER, k[source], v[source], slots)
    assert torch.equal(batch.kv_data, gathered)


@pytest.mark.parametrize("window", [None, 1, 7, 40])
@pytest.mark.parametrize("group", [1, 4])
def test_references_agree_with_dense_sdpa(group, window):
    batch = make_batch(CONTEXTS, 2, 64, 16)
    query_lens = [1, 15, 3, 17, 37]
    q = queries(sum(query_lens), 2 * group, 64)
    args = (q, batch.kv_data, LAYER, batch.block_tables, start_loc(query_lens), batch.context_lens, 0.125, window)
    dense = dense_attention(q, batch, query_lens, 0.125, window).float()
    torch.testing.assert_close(ref.prefill_attention_reference(*args), dense, **TOL[torch.float32])
    q1 = queries(len(CONTEXTS), 2 * group, 64)
    args = (q1, batch.kv_data, LAYER, batch.block_tables, batch.context_lens, 0.125, window)
    dense = dense_attention(q1, batch, [1] * len(CONTEXTS), 0.125, window).float()
    torch.testing.assert_close(ref.decode_attention_reference(*args), dense, **TOL[torch.float32])


@kernels
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_decode_matches_reference(block_size, head_dim, group):
    num_kv_heads = 2 if group <= 2 else 1  # (a small head count keeps the interpreter quick)
    batch = make_batch(CONTEXTS, num_kv_heads, head_dim, block_size)
    q = queries(len(CONTEXTS), num_kv_heads * group, head_dim, strided=group == 2)
    args = (q, batch.kv_data, LAYER, batch.block_tables, batch.context_lens, head_dim**-0.5)
    # partitions of 32 keys in tiles of 16: several partitions and tiles per sequence
    out = da.decode_attention(*args, partition_size=32, block_n=16)
    torch.testing.assert_close(out, ref.decode_attention_reference(*args), **TOL[torch.float32])


@kernels
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_prefill_matches_reference(block_size, head_dim, group):
    # mixed batch: whole prompts, single tokens, chunks after cached prefixes (prefix-cache hits)
    contexts, query_lens = [1, 15, 16, 17, 100, 40], [1, 15, 1, 17, 37, 23]
    num_kv_heads = 2 if group <= 2 else 1
    batch = make_batch(contexts, num_kv_heads, head_dim, block_size)
    q = queries(sum(query_lens), num_kv_heads * group, head_dim, strided=group == 2)
    args = (q, batch.kv_data, LAYER, batch.block_tables, start_loc(query_lens), batch.context_lens, head_dim**-0.5)
    # tiles of 32 (group 8: 64) rows: several query tiles per sequence, some of them partly padding
    out = pa.prefill_attention(*args, block_m=max(32, 8 * group), block_n=16)
    torch.testing.assert_close(out, ref.prefill_attention_reference(*args), **TOL[torch.float32])


@kernels
@pytest.mark.parametrize("window", [1, 7, 16, 40])
def test_sliding_window(window):
    batch = make_batch(CONTEXTS, 2, 64, 16)
    q1 = queries(len(CONTEXTS), 4, 64)
    args = (q1, batch.kv_data, LAYER, batch.block_tables, batch.context_lens, 0.125, window)
    out = da.decode_attention(*args, partition_size=32, block_n=16)
    torch.testing.assert_close(out, ref.decode_attention_reference(*args), **TOL[torch.float32])
    query_lens = [1, 15, 3, 17, 60]
    q = queries(sum(query_lens), 4, 64)
    args = (q, batch.kv_data, LAYER, batch.block_tables, start_loc(query_lens), batch.context_lens, 0.125, window)
    out = pa.prefill_attention(*args, block_m=16, block_n=16)
    torch.testing.assert_close(out, ref.prefill_attention_reference(*args), **TOL[torch.float32])


@kernels
def test_int64_metadata_and_head_dim_not_a_power_of_two():
    """The engine's metadata is int64 (``AttentionMetadata``); head dim 80 pads to 128 lanes."""
    batch = make_batch(CONTEXTS, 2, 80, 16)
    tables, context_lens = batch.block_tables.long(), batch.context_lens.long()
    q1 = queries(len(CONTEXTS), 4, 80)
    args = (q1, batch.kv_data, LAYER, tables, context_lens, 80**-0.5, 40)
    out = da.decode_attention(*args, partition_size=32, block_n=16)
    torch.testing.assert_close(out, ref.decode_attention_reference(*args), **TOL[torch.float32])
    query_lens = [1, 15, 3, 17, 60]
    q = queries(sum(query_lens), 4, 80)
    args = (q, batch.kv_data, LAYER, tables, start_loc(query_lens).long(), context_lens, 80**-0.5)
    out = pa.prefill_attention(*args, block_m=16, block_n=16)
    torch.testing.assert_close(out, ref.prefill_attention_reference(*args), **TOL[torch.float32])
    k, v = (torch.randn(3, 2, 80, device=DEVICE) for _ in range(2))
    slots = torch.tensor([0, 17, 40], device=DEVICE)
    expected = batch.kv_data.clone()
    ref.write_kv_reference(expected, LAYER, k, v, slots)
    pa.write_kv(batch.kv_data, LAYER, k, v, slots)
    assert torch.equal(batch.kv_data, expected)


@kernels
@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_and_default_tiles(dtype):
    batch = make_batch(CONTEXTS, 2, 64, 16, dtype=dtype)
    q1 = queries(len(CONTEXTS), 8, 64, dtype)
    args = (q1, batch.kv_data, LAYER, batch.block_tables, batch.context_lens, 0.125)
    torch.testing.assert_close(da.decode_attention(*args), ref.decode_attention_reference(*args), **TOL[dtype])
    query_lens = [1, 15, 3, 17, 100]
    q = queries(sum(query_lens), 8, 64, dtype)
    args = (q, batch.kv_data, LAYER, batch.block_tables, start_loc(query_lens), batch.context_lens, 0.125)
    torch.testing.assert_close(pa.prefill_attention(*args), ref.prefill_attention_reference(*args), **TOL[dtype])


@kernels
def test_rejects_what_the_kernels_cannot_read():
    batch = make_batch([5], 2, 64, 16)
    q = queries(1, 6, 64)
    with pytest.raises(ValueError, match="3 heads"):
        da.decode_attention(q[:, :3], batch.kv_data, LAYER, batch.block_tables, batch.context_lens, 0.125)
    with pytest.raises(ValueError, match="layer 2"):
        da.decode_attention(q[:, :4], batch.kv_data, 2, batch.block_tables, batch.context_lens, 0.125)
    with pytest.raises(ValueError, match="head_dim rows"):
        pa.write_kv(
            batch.kv_data.transpose(3, 5), LAYER, q[:, :2], q[:, :2], torch.zeros(1, dtype=torch.long, device=DEVICE)
        )


@pytest.mark.skipif(not pa.available(), reason="needs triton")
def test_kernels_compile_for_sm90():
    """What the interpreter never checks: Triton compiles each kernel for an H100/H200 (sm_90, bf16, default
    tiles) down to a cubin with the ptxas it ships, no GPU needed.  In a process of its own: the interpreter
    (TRITON_INTERPRET=1) replaces Triton's library functions at import, which compiling cannot use."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    code = "from test_paged_attention_kernels import compile_for_sm90; compile_for_sm90()"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def compile_for_sm90() -> None:
    """Compile every kernel (paged attention, the fused rotary/K-V write, decode attention fused with both,
    sampling) for sm_90 at head dims 64/128, GQA groups 4, 8, 7, int32 and int64 metadata.  Pointers and strides
    carry the divisibility-by-16 hint that launches with such values get (vectorised, pipelined K/V loads)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    def build(kernel, constants, index="i32", **options):
        names = [n for n in kernel.arg_names if n not in constants]
        types = {"k_ptr": "*bf16", "v_ptr": "*bf16", "kv_ptr": "*bf16", "q_ptr": "*bf16", "out_ptr": "*bf16",
                 "part_acc_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", "slot_ptr": "*i64", "source_ptr": "*i64",
                 "scale_log2": "fp32", "table_ptr": "*bf16", "rope_ptr": "*bf16", "logits_ptr": "*fp32",
                 "inv_temp_ptr": "*fp32",
                 "threshold_ptr": "*fp32", "key_ptr": "*i64", "greedy_ptr": "*i1", "best_ptr": "*fp32",
                 "best_index_ptr": "*i64"}  # fmt: skip
        signature = {n: types.get(n, f"*{index}" if n.endswith("_ptr") else "i32") for n in names}
        signature |= {n: "constexpr" for n in constants}
        aligned = [n for n in names if n.endswith("_ptr") or n == "layer_offset" or n.startswith("stride")]
        attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned if n != "stride_table"}
        source = ASTSource(kernel, {n: signature[n] for n in kernel.arg_names}, constants, attrs)
        assert compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["cubin"]

    for head_dim, group, index in [(64, 4, "i32"), (128, 8, "i64"), (128, 7, "i32")]:
        dims = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim)
        for has_source in (False, True):
            build(pa._write_kv_kernel, dict(HEAD_DIM=head_dim, HEADS_PAD=8, HEAD_DIM_PAD=head_dim,
                                            HAS_SOURCE=has_source))
        for fused, has_source in [(False, False), (True, False), (True, True)]:  # alone, fused with rotary + write
            build(
                da._decode_partition_kernel,
                dict(**dims, GROUP=group, GROUP_PAD=16, BLOCK_SIZE=16, BLOCK_N=da.DECODE_BLOCK_N,
                     PARTITION_SIZE=da.DECODE_PARTITION_SIZE, DOT_PRECISION="tf32", FUSED=fused,
                     HAS_SOURCE=has_source, USE_PDL=True),
                index, num_warps=da.DECODE_NUM_WARPS,
            )  # fmt: skip
        build(da._decode_reduce_kernel, dict(**dims, PARTITION_SIZE=da.DECODE_PARTITION_SIZE, USE_PDL=True), index)
        build(
            pa._prefill_kernel,
            dict(**dims, GROUP=group, BLOCK_SIZE=16, BLOCK_M=pa.PREFILL_BLOCK_M,
                 BLOCK_Q=pa.PREFILL_BLOCK_M // group, BLOCK_N=pa.PREFILL_BLOCK_N, DOT_PRECISION="tf32"),
            index, num_warps=pa.PREFILL_NUM_WARPS,
        )  # fmt: skip
        for has_source in (False, True):
            build(rotary._rotary_write_kv_kernel, dict(HALF=head_dim // 2, BLOCK_HALF=head_dim // 2, BLOCK_HQ=32,
                                                       BLOCK_HK=8, HAS_SOURCE=has_source), index)  # fmt: skip
    for all_greedy in (False, True):
        build(sampling._sample_kernel, dict(SPAN=4096, BLOCK=1024, ALL_GREEDY=all_greedy))


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda" or not pa.available(), reason="needs CUDA and triton")
def test_one_compiled_variant_whatever_the_batch():
    """Batch size and block-table width change every step; each value class (1, a multiple of 16, other) must
    not compile a kernel variant of its own (a stall of seconds the first time a class shows up while serving).
    Counted as the variants these calls add to each kernel's cache (earlier tests compiled others: other dtypes,
    head dims, tiles); the decode partition is pinned, since its size is a constexpr chosen from the shapes.  The
    decode partition kernel runs alone and fused with rotary and the K/V write (two variants)."""
    device = torch.cuda.current_device()
    kernels_checked = (da._decode_partition_kernel, da._decode_reduce_kernel, pa._prefill_kernel)
    before = [set(kernel.device_caches[device][0]) for kernel in kernels_checked]
    head_dim, group = 64, 4
    for num_seqs in (1, 2, 16, 17):
        lens = [40 + 16 * i for i in range(num_seqs)]
        batch = make_batch(lens, 2, head_dim, 16, torch.float16, seed=num_seqs)
        q = queries(num_seqs, 2 * group, head_dim, torch.float16)
        da.decode_attention(q, batch.kv_data, LAYER, batch.block_tables, batch.context_lens, 0.125, partition_size=64)
        k, v = queries(num_seqs, 2, head_dim, torch.float16), queries(num_seqs, 2, head_dim, torch.float16)
        positions = batch.context_lens.long() - 1
        slots = torch.stack([slots_of(batch.block_tables[i], positions[i : i + 1], 16)[0] for i in range(num_seqs)])
        table = torch.randn(max(lens), 2, head_dim, device=DEVICE, dtype=torch.float16)
        da.rotary_decode_attention(q, k, v, positions, table, batch.kv_data, LAYER, slots, batch.block_tables,
                                   batch.context_lens, 0.125, partition_size=64)  # fmt: skip
        q = queries(sum(lens), 2 * group, head_dim, torch.float16)
        pa.prefill_attention(q, batch.kv_data, LAYER, batch.block_tables, start_loc(lens), batch.context_lens, 0.125)
    for kernel, known in zip(kernels_checked, before):
        variants = 2 if kernel is da._decode_partition_kernel else 1
        assert len(set(kernel.device_caches[device][0]) - known) <= variants, kernel.fn.__name__


def test_decode_partitions_shrink_to_fill_the_gpu():
    assert da.decode_partition_size(32, 8, 256) == 512  # 256 programs already
    assert da.decode_partition_size(1, 8, 256) == da.DECODE_BLOCK_N  # 8 programs at 512 keys; 32 at 64
    assert da.decode_partition_size(1, 8, 8192) == 256  # 16 partitions x 8 heads at 512: 128; 256 at 256
    assert da.decode_partition_size(2, 8, 4096) == 256


@kernels
def test_decode_default_partition_matches_reference():
    batch = make_batch([1, 70, 200], 1, 64, 16)  # one KV head: the default shrinks to 64-key partitions
    q = queries(3, 4, 64)
    args = (q, batch.kv_data, LAYER, batch.block_tables, batch.context_lens, 0.125)
    assert da.decode_partition_size(3, 1, batch.block_tables.shape[1] * 16) == da.DECODE_BLOCK_N
    torch.testing.assert_close(da.decode_attention(*args), ref.decode_attention_reference(*args), **TOL[torch.float32])


@kernels
@pytest.mark.parametrize("window", [None, 30])
def test_decode_single_partition_skips_the_reduce(monkeypatch, window):
    """When every key fits one partition the partition kernel writes the output; the reduce is not launched."""
    batch = make_batch([1, 70, 100], 2, 64, 16)  # block tables of 9 blocks: 144 keys, one 256-key partition
    q = queries(3, 8, 64)
    args = (q, batch.kv_data, LAYER, batch.block_tables, batch.context_lens, 0.125, window)
    expected = ref.decode_attention_reference(*args)
    monkeypatch.setattr(da, "_decode_reduce_kernel", None)  # launching it would raise
    torch.testing.assert_close(da.decode_attention(*args, partition_size=256), expected, **TOL[torch.float32])

