"""Decode attention per layer, unfused against fused, inside CUDA graphs on one GPU.

    python -m bench.decode_attention_gpu              # from the repository root; < 60 s on an H200

Llama-3.2-1B's attention shape (32 query heads, 8 KV heads, head dim 64, cache blocks of 16, bf16) at batch 1
and 32, contexts 340 and 2,048 tokens: the time of one layer's decode attention as the triton backend ran it
before (``rotary.apply_rotary_write_kv_``, then ``decode_attention``: split-K partitions, plus their reduce when
there is more than one) and as it runs it now (``decode_attention.rotary_decode_attention``: one kernel, plus the
reduce), their ratio, the KV read rate of the fused form, and the largest difference between the two outputs
(0: the same rounding).  The block table is as wide as the decode graphs' bucket (the next power of two of the
blocks), so the split-K partitions are those ``decode_partition_size`` picks in serving.

Timing: ``--layers`` layers (each its own layer of one cache, its own q/k/v) captured in one CUDA graph,
replayed ``--replays`` times between CUDA events; a layer's time is the total over layers x replays.  At batch
1 and 340 tokens a layer's K/V (0.7 MB) stays in the L2 cache between replays, as it does not in a real step
(the weights stream through in between): that row measures launches and latency more than bandwidth.  The decode
kernels are launched with programmatic dependent launch as the engine launches them (``PDSERVE_PDL=0``: without).
Imports only torch, triton and ``common.engine.kernels`` (the GPU machine has no pyzmq/msgspec).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from common.engine.kernels import decode_attention, rotary

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 64, 16
CASES = [(1, 340), (1, 2048), (32, 340), (32, 2048)]  # (batch, context)


def layer_inputs(batch: int, context: int, layers: int, device: torch.device) -> dict:
    """A cache of ``layers`` layers holding ``batch`` sequences of ``context`` tokens in shuffled blocks, each
    layer's q/k/v of the new token (position ``context - 1``), a random rope table."""
    dtype, gen = torch.bfloat16, torch.Generator(device).manual_seed(0)
    needed = -(-context // BLOCK_SIZE)
    width = 1 << (needed - 1).bit_length()  # the decode graphs' bucket
    blocks = torch.randperm(batch * needed, device=device, generator=gen)
    tables = torch.zeros(batch, width, dtype=torch.int64, device=device)
    tables[:, :needed] = blocks.view(batch, needed)
    kv = torch.randn(batch * needed, KV_HEADS, BLOCK_SIZE, layers, 2, HEAD_DIM, generator=gen, device=device)
    qkv = torch.randn(layers, batch, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=gen, device=device).to(dtype)
    positions = torch.full((batch,), context - 1, dtype=torch.int64, device=device)
    return dict(
        kv=kv.to(dtype), tables=tables, qkv=qkv, positions=positions, context_lens=positions + 1,
        slots=tables[:, (context - 1) // BLOCK_SIZE] * BLOCK_SIZE + (context - 1) % BLOCK_SIZE,
        table=rope_table(context, gen, device).to(dtype),
    )  # fmt: skip


def rope_table(positions: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """``[positions, 2, HEAD_DIM]`` cos and signed sin of random angles (a rotation: q rotated in place replay
    after replay keeps its norm)."""
    angles = torch.rand(positions, HEAD_DIM // 2, generator=gen, device=device) * 6.283
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([torch.cat([cos, cos], 1), torch.cat([-sin, sin], 1)], 1)


def split(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The q/k/v views of one layer's packed qkv ``[B, (H + 2 Hkv) D]``, as the model takes them."""
    n = qkv.shape[0]
    q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=1)
    return q.view(n, HEADS, HEAD_DIM), k.view(n, KV_HEADS, HEAD_DIM), v.view(n, KV_HEADS, HEAD_DIM)


def unfused(x: dict, layer: int, qkv: torch.Tensor) -> torch.Tensor:
    q, k, v = split(qkv)
    rotary.apply_rotary_write_kv_(q, k, v, x["positions"], x["table"], x["kv"], layer, x["slots"])
    return decode_attention.decode_attention(q, x["kv"], layer, x["tables"], x["context_lens"], HEAD_DIM**-0.5)


def fused(x: dict, layer: int, qkv: torch.Tensor) -> torch.Tensor:
    q, k, v = split(qkv)
    return decode_attention.rotary_decode_attention(
        q, k, v, x["positions"], x["table"], x["kv"], layer, x["slots"], x["tables"], x["context_lens"],
        HEAD_DIM**-0.5,
    )  # fmt: skip


def graph_time(step: Callable[[], object], replays: int) -> float:
    """Seconds per replay of a CUDA graph of ``step`` (after a warm-up call and three warm-up replays)."""
    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / replays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--replays", type=int, default=200)
    args = parser.parse_args()
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}; {HEADS} q heads, {KV_HEADS} kv heads, head dim {HEAD_DIM}, "
          f"blocks of {BLOCK_SIZE}, bf16; per layer, {args.layers} layers x {args.replays} replays of a CUDA graph")
    print("batch context partition parts unfused_us fused_us unfused/fused fused_kv_GB/s max_diff")
    for batch, context in CASES:
        x = layer_inputs(batch, context, args.layers, device)
        size = decode_attention.decode_partition_size(batch, KV_HEADS, x["tables"].shape[1] * BLOCK_SIZE)
        parts = -(-x["tables"].shape[1] * BLOCK_SIZE // size)
        kv_before = x["kv"].clone()
        expected, out = unfused(x, 0, x["qkv"][0].clone()), fused(x, 0, x["qkv"][0])
        diff = (expected.float() - out.float()).abs().max().item()
        x["kv"].copy_(kv_before)
        del kv_before
        times = {}
        for name, form in (("unfused", unfused), ("fused", fused)):
            qkv = x["qkv"].clone()  # the unfused form rotates q in place, replay after replay
            times[name] = graph_time(lambda: [form(x, i, qkv[i]) for i in range(args.layers)], args.replays)
            times[name] /= args.layers
        kv_bytes = batch * context * KV_HEADS * HEAD_DIM * 2 * 2
        print(f"{batch:5d} {context:7d} {size:9d} {parts:5d} {times['unfused'] * 1e6:10.2f} "
              f"{times['fused'] * 1e6:8.2f} {times['unfused'] / times['fused']:13.2f} "
              f"{kv_bytes / times['fused'] / 1e9:13.0f} {diff:8.2g}")  # fmt: skip


if __name__ == "__main__":
    main()
