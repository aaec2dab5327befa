"""The decode GEMVs (``common.engine.kernels.gemv``) against cuBLAS (``F.linear``) on one GPU, in CUDA graphs.

    python -m bench.gemv_gpu                      # from the repository root; < 120 s on an H200
    python -m bench.gemv_gpu --sweep-rows none    # the table only

For the Llama-3.2-1B and Llama-3.1-8B shapes' four projections (qkv, o, gate_up, down; bf16) at M = 1, 2, 4, 8
rows: the time of one call of ``F.linear`` and of ``gemv.gemv`` with its default tile (``pick_config``), their
ratio, the GEMV's GB/s (weight + input + output bytes) and its fraction of the measured copy bandwidth, and
its largest difference from ``F.linear`` relative to the output's largest value.  ``fused`` rows time the
layer's sequences as the triton forward runs them: ``fused_add_rms_norm`` + ``F.linear`` (+ ``silu_and_mul``)
against one ``norm_gemv``; the summary adds up what a batch-1 1B decode step saves over its 16 layers.  At
M = 1 ``gemv`` runs the one-row kernel (``row_gemv``).  Then the chains: one row through the layers'
projections in one graph (cuBLAS, the tiled GEMV, the one-row GEMV; programmatic dependent launch off and on)
against the weights' read at the copy rate.

Timing: every call reads its own copy of the weight (copies enough to exceed the L2 cache several times
over), all captured in one CUDA graph replayed ``--replays`` times between CUDA events; a call's time is
the total over the calls.  Bandwidth: a 1 GiB device copy (bytes read + written over its time).  The
sweep (``--sweep-rows``) times every tile of ``TILES`` per shape and prints the best against the default.
Imports only torch, triton and ``common.engine.kernels`` (the GPU machine has no pyzmq/msgspec).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from common.engine.kernels import activation, gemv, norm, pdl
from common.engine.kernels.gemv import GemvConfig

L2_SPAN = 256 << 20  # bytes of weight copies a graph cycles through (the H200's L2 is 50 MiB)
SHAPES = {  # name -> (hidden, q + 2 kv width, intermediate): the projections [N, K] follow
    "1b": (2048, 2048 + 2 * 512, 8192),
    "8b": (4096, 4096 + 2 * 1024, 14336),
}
ROWS = (1, 2, 4, 8)
TILES = [
    GemvConfig(block_n, block_k, split_k, warps)
    for block_n, block_k, split_k, warps in itertools.product((2, 4, 8, 16), (256, 512, 1024, 2048), (1, 2, 4),
                                                              (2, 4, 8))  # fmt: skip
]
MAX_TILE = 16384  # block_n x block_k weight elements a program holds: larger tiles spill registers
BUDGET_S = 110.0  # the sweep stops when the whole run has taken this long


def projections(hidden: int, qkv: int, inter: int) -> dict[str, tuple[int, int]]:
    return {"qkv": (qkv, hidden), "o": (hidden, hidden), "gate_up": (2 * inter, hidden), "down": (hidden, inter)}


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second of a 1 GiB device copy (median of 10 after warm-up)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / median_time(lambda: dst.copy_(src), replays=10)


def median_time(fn: Callable[[], object], replays: int) -> float:
    """Median seconds of ``fn`` between CUDA events, after three warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(replays):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def graph_time(calls: list[Callable[[], object]], replays: int) -> float:
    """Seconds per call of ``calls`` (run once each, compiled first) captured in one CUDA graph."""
    for call in calls[:2]:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return median_time(graph.replay, replays) / len(calls)


def weights(n: int, k: int, device: torch.device) -> list[torch.Tensor]:
    """Copies of a random bf16 ``[n, k]`` weight (scaled as a trained one's rows), enough to exceed ``L2_SPAN``."""
    copies = max(2, -(-L2_SPAN // (n * k * 2)))
    first = torch.randn(n, k, device=device, dtype=torch.bfloat16) * k**-0.5
    return [first] + [first.clone() for _ in range(copies - 1)]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def bench_plain(ws, x, replays, config=None) -> tuple[float, float]:
    """(F.linear, gemv) seconds per call of ``x`` against each weight of ``ws``."""
    cublas = graph_time([lambda w=w: F.linear(x, w) for w in ws], replays)
    triton = graph_time([lambda w=w: gemv.gemv(x, w, None, config) for w in ws], replays)
    return cublas, triton


def bench_fused(ws, x, silu_mul: bool, replays: int) -> tuple[float, float, float]:
    """(norm + F.linear [+ silu_and_mul], norm_gemv) seconds per call, and the latter's relative error."""
    residual = torch.randn_like(x)
    nw = torch.rand(x.shape[1], device=x.device, dtype=x.dtype) + 0.5

    def unfused(w: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        h, _ = norm.fused_add_rms_norm(x, res, nw, 1e-5)  # res updated in place, as the triton forward does
        out = F.linear(h, w)
        return activation.silu_and_mul(out) if silu_mul else out

    error = relative_error(gemv.norm_gemv(x, residual, nw, 1e-5, ws[0], silu_mul=silu_mul)[0],
                           unfused(ws[0], residual.clone()))  # fmt: skip
    scratch = residual.clone()
    cublas = graph_time([lambda w=w: unfused(w, scratch) for w in ws], replays)
    triton = graph_time([lambda w=w: gemv.norm_gemv(x, residual, nw, 1e-5, w, silu_mul=silu_mul) for w in ws],
                        replays)  # fmt: skip
    return cublas, triton, error


def table(device: torch.device, bandwidth: float, replays: int) -> dict[tuple[str, int], float]:
    """Prints the per-projection table; returns what each 1B projection saves per call at each M (seconds)."""
    print(f"{'shape':5} {'proj':8} {'M':>2} {'cuBLAS us':>9} {'gemv us':>8} {'ratio':>6} {'GB/s':>6} {'of copy':>7} "
          f"{'rel err':>8}  tile")  # fmt: skip
    saved: dict[tuple[str, int], float] = {}
    for shape, dims in SHAPES.items():
        for proj, (n, k) in projections(*dims).items():
            ws = weights(n, k, device)
            for rows in ROWS:
                x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
                cublas, triton = bench_plain(ws, x, replays)
                nbytes = (n * k + rows * (k + n)) * 2
                error = relative_error(gemv.gemv(x, ws[0]), F.linear(x, ws[0]))
                print(f"{shape:5} {proj:8} {rows:2} {cublas * 1e6:9.2f} {triton * 1e6:8.2f} {cublas / triton:6.2f} "
                      f"{nbytes / triton / 1e9:6.0f} {nbytes / triton / bandwidth:7.1%} {error:8.1e}  "
                      f"{gemv.default_config(rows, n, k)}")  # fmt: skip
                if proj in ("qkv", "gate_up"):
                    fused_cublas, fused, ferr = bench_fused(ws, x, proj == "gate_up", replays)
                    print(f"{shape:5} {proj + '+':8} {rows:2} {fused_cublas * 1e6:9.2f} {fused * 1e6:8.2f} "
                          f"{fused_cublas / fused:6.2f} {'':6} {'':7} {ferr:8.1e}  fused: norm (+ SiLU*mul)")
                    cublas, triton = fused_cublas, fused
                if shape == "1b":
                    saved[proj, rows] = cublas - triton
            del ws
            torch.cuda.empty_cache()
    return saved


def layer_chain(dims: tuple[int, int, int], layers: int, kind: str, device: torch.device) -> Callable[[], object]:
    """One row through ``layers`` decoder layers' projections as a batch-1 decode step runs them (qkv with the
    residual add and norm, o on the attention-sized slice, gate_up with norm and SiLU*mul, down), every layer
    its own weights: ``kind`` "cublas" (``fused_add_rms_norm`` + ``F.linear`` + ``silu_and_mul``), "tiled"
    (``gemv``'s tiled kernel, ``pick_config``) or "row" (the default: ``row_gemv``)."""
    hidden, qkv, inter = dims
    dtype = torch.bfloat16
    ws = [{p: torch.randn(n, k, device=device, dtype=dtype) * k**-0.5 for p, (n, k) in projections(*dims).items()}
          for _ in range(layers)]  # fmt: skip
    norms = torch.rand(2, hidden, device=device, dtype=dtype) + 0.5
    x0 = torch.randn(1, hidden, device=device, dtype=dtype)

    def tiled(n: int, k: int) -> GemvConfig | None:
        return gemv.pick_config(n, k) if kind == "tiled" else None

    def run() -> object:
        h, res = x0, torch.zeros_like(x0)
        for w in ws:
            if kind == "cublas":
                normed, res = norm.fused_add_rms_norm(h, res, norms[0], 1e-5)
                a = F.linear(F.linear(normed, w["qkv"])[:, :hidden].contiguous(), w["o"])
                normed, res = norm.fused_add_rms_norm(a, res, norms[1], 1e-5)
                h = F.linear(activation.silu_and_mul(F.linear(normed, w["gate_up"])), w["down"])
                continue
            out, res = gemv.norm_gemv(h, res, norms[0], 1e-5, w["qkv"], config=tiled(qkv, hidden))
            a = gemv.gemv(out[:, :hidden].contiguous(), w["o"], config=tiled(hidden, hidden))
            act, res = gemv.norm_gemv(a, res, norms[1], 1e-5, w["gate_up"], silu_mul=True, config=tiled(inter, hidden))
            h = gemv.gemv(act, w["down"], config=tiled(hidden, inter))
        return h

    return run


def chains(device: torch.device, bandwidth: float, replays: int) -> None:
    """Each shape's layers of projections in one CUDA graph (``layer_chain``): cuBLAS, the tiled GEMV and the
    row GEMV, each with programmatic dependent launch off and on, against the weights' read at the copy rate."""
    print(f"\n{'shape':5} {'chain':7} {'PDL':3} {'us':>8} {'weights at copy rate / time':>27}")
    before = os.environ.get(pdl.ENV)
    for shape, dims in SHAPES.items():
        layers = 16 if shape == "1b" else 8
        weight_bytes = layers * 2 * sum(n * k for n, k in projections(*dims).values())
        for kind in ("cublas", "tiled", "row"):
            for on in ("0", "1"):
                os.environ[pdl.ENV] = on
                pdl._enabled.cache_clear()
                seconds = graph_time([layer_chain(dims, layers, kind, device)], replays)
                print(f"{shape:5} {kind:7} {on:>3} {seconds * 1e6:8.1f} {weight_bytes / bandwidth / seconds:27.2f}")
                torch.cuda.empty_cache()
        print(f"{shape}: {layers} layers, {weight_bytes / 1e9:.2f} GB of weights")
    if before is None:
        os.environ.pop(pdl.ENV)
    else:
        os.environ[pdl.ENV] = before
    pdl._enabled.cache_clear()


def sweep(device: torch.device, rows_list: list[int], replays: int, deadline: float) -> None:
    """The best tile of ``TILES`` per shape against ``pick_config``'s (plain GEMV, no fusion), the first
    rows of ``rows_list`` over every shape first; stops at ``time.monotonic()`` ``deadline``."""
    print(f"\nsweep ({len(TILES)} tiles, rows {rows_list}; {deadline - time.monotonic():.0f} s left)")
    for rows in rows_list:
        for shape, dims in SHAPES.items():
            for proj, (n, k) in projections(*dims).items():
                if time.monotonic() > deadline:
                    print("sweep: out of time, the rest skipped")
                    return
                ws = weights(n, k, device)
                x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
                default = gemv.pick_config(n, k)
                results = []
                for tile in TILES:
                    if tile.block_n * tile.block_k > MAX_TILE or (tile.split_k > 1 and k < 4096):
                        continue
                    if time.monotonic() > deadline:
                        break
                    results.append((graph_time([lambda w=w: gemv.gemv(x, w, None, tile) for w in ws], replays),
                                    tile))  # fmt: skip
                if not results:
                    print("sweep: out of time, the rest skipped")
                    return
                default_s = graph_time([lambda w=w: gemv.gemv(x, w, None, default) for w in ws], replays)
                results.sort(key=lambda r: r[0])
                top = ", ".join(f"{t.block_n}x{t.block_k}/s{t.split_k}/w{t.num_warps} {s * 1e6:.2f}"
                                for s, t in results[:3])  # fmt: skip
                print(f"{shape} {proj:7} M={rows}: default {default_s * 1e6:.2f} us, best {results[0][0] * 1e6:.2f} "
                      f"us ({default_s / results[0][0]:.2f}x); top (block_n x block_k/split/warps us): {top}")
                del ws
                torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replays", type=int, default=20, help="graph replays timed per measurement (median)")
    parser.add_argument("--sweep-rows", default="1,8", help="rows the tile sweep covers (comma list), or none")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="the sweep stops when the run took this")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    started = time.monotonic()
    bandwidth = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name(device)}: copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    saved = table(device, bandwidth, args.replays)
    chains(device, bandwidth, args.replays)
    for rows in ROWS:
        per_layer = sum(saved[proj, rows] for proj in ("qkv", "o", "gate_up", "down"))
        print(f"1b, M={rows}: the GEMVs save {per_layer * 1e6:.2f} us a layer, {16 * per_layer * 1e6:.1f} us "
              "a step (16 layers; qkv and gate_up with their fused norm / SiLU*mul)")  # fmt: skip
    if args.sweep_rows != "none":
        sweep(device, [int(r) for r in args.sweep_rows.split(",")], args.replays, started + args.budget_s)
    print(f"total {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
