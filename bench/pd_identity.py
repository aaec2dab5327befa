"""Token identity of P/D against colocated serving, through real processes, over one forced KV transport.

Starts a registry, a prefill, a decode and a colocated (``--role both``)
engine (``bench/processes.py``) with the same model, device, dtype and
``--kv-transport`` and ``--kv-mode``; for each prompt length runs one greedy
request colocated and one as the two P/D legs (``bench/engine_driver.py``; push
mode: decode registers, then prefill writes into its blocks), and prints PASS when
the token ids are equal, the KV moved (no recompute) and it moved over the forced
transport.  Exits 1 on any FAIL.

    python -m bench.pd_identity --device cpu --kv-transport shm
    python -m bench.pd_identity --device cuda --kv-transport nvlink      # both engines on one GPU
    python -m bench.pd_identity --device cuda --kv-transport nvlink --kv-mode push   # prefill writes decode's blocks
    python -m bench.pd_identity --device cuda --kv-transport nvlink --prefill-args "-tp 2"  # 2 GPUs: TP 2 -> 1
"""

from __future__ import annotations

import argparse
import shlex
import sys

from bench.engine_driver import EngineDriver, prompt_ids, tokens
from bench.processes import Processes
from common.messages import SamplingParams
from common.service import new_event_loop

LENGTHS = (1, 7, 15, 16, 17, 32, 48, 100, 300)
ENGINES = ("prefill", "decode", "both")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The flags that say which engines ``start_engines`` starts."""
    p.add_argument("--model", default="demo", help="checkpoint directory, or demo (default)")
    p.add_argument("--device", default="cpu", help="every engine's --device: cpu (default) or cuda")
    p.add_argument("--dtype", help="every engine's --dtype (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--kv-transport", default="shm", help="every engine's --kv-transport (default shm)")
    p.add_argument("--num-kv-blocks", type=int, default=256, help="KV cache blocks per engine (default 256)")
    p.add_argument("--engine-args", default="", help="more flags for every engine, one string")
    p.add_argument("--prefill-args", default="", help="more flags for the prefill only, e.g. '-tp 2'")
    p.add_argument("--decode-args", default="", help="more flags for the decode only, e.g. '-tp 2 --block-size 32'")
    p.add_argument("--ready-timeout-s", type=float, default=300.0, help="wait this long for the engines to start")


def add_kv_mode(p: argparse.ArgumentParser) -> None:
    """``--kv-mode``, which ``start_engines`` starts every engine with."""
    p.add_argument("--kv-mode", choices=("read", "push"), default="read",
                   help="how P/D moves the KV (every engine started with it; default read)")


async def start_engines(procs: Processes, args: argparse.Namespace) -> None:
    """Registry, prefill, decode and colocated ``both``, all registered (names: ``ENGINES``)."""
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    flags = ["--model", args.model, "--device", args.device, "--dtype", dtype, "--kv-mode", args.kv_mode,
             *shlex.split(args.engine_args)]
    procs.start_registry()
    procs.start_engine("prefill", "prefill", *flags, *shlex.split(args.prefill_args), num_kv_blocks=args.num_kv_blocks,
                       kv_transport=args.kv_transport)
    procs.start_engine("decode", "decode", *flags, *shlex.split(args.decode_args), num_kv_blocks=args.num_kv_blocks,
                       kv_transport=args.kv_transport)
    procs.start_engine("both", "prefill", "--role", "both", *flags, num_kv_blocks=args.num_kv_blocks,
                       kv_transport=args.kv_transport)
    await procs.wait_registered(*ENGINES, timeout_s=args.ready_timeout_s)


async def check(driver: EngineDriver, length: int, sampling: SamplingParams, kv_mode: str) -> str:
    """'' when P/D equals colocated for a prompt of ``length`` tokens, else what differs."""
    ids = prompt_ids(length, seed=length)
    reference = await driver.reference(ids, sampling)
    legs = driver.push_pd if kv_mode == "push" else driver.pd
    pre, dec = await legs(f"identity-{length}", ids, sampling)
    timings = dec[0].timings or {}
    moved = (pre[-1].timings or {}).get("kv_bytes") if kv_mode == "push" else timings.get("kv_bytes")
    if "kv_failed" in timings or not moved:
        return f"the KV did not move ({kv_mode}; prefill timings {pre[-1].timings}, decode timings {timings})"
    got = tokens(pre + dec)
    if got != reference:
        first = next((i for i, (a, b) in enumerate(zip(got, reference)) if a != b), min(len(got), len(reference)))
        return f"tokens differ from position {first}: P/D {got} colocated {reference}"
    return ""


async def run(args: argparse.Namespace) -> bool:
    """Print one PASS/FAIL line per prompt length and the transport line; True when all passed."""
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    failures = 0
    async with Processes() as procs:
        await start_engines(procs, args)
        driver = EngineDriver(procs.engine_endpoints(), timeout_s=120.0)
        try:
            for length in args.lengths:
                problem = await check(driver, length, sampling, args.kv_mode)
                failures += bool(problem)
                print(f"{'FAIL' if problem else 'PASS'} prompt {length:5d} tokens, {args.max_tokens} new"
                      f"{': ' + problem if problem else ''}", flush=True)
            # the side that opens the transfer chooses its transport: decode reads, prefill pushes
            mover, peer = ("prefill", "decode") if args.kv_mode == "push" else ("decode", "prefill")
            chosen = (await driver.stats(mover)).kv_transports
        finally:
            await driver.close()
    ok = chosen == {peer: args.kv_transport}
    print(f"{'PASS' if ok else 'FAIL'} the {mover} moved the KV ({args.kv_mode}) over {chosen.get(peer)} "
          f"(forced {args.kv_transport}); {args.device}, model {args.model}", flush=True)
    return ok and not failures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    add_kv_mode(p)
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=list(LENGTHS),
                   help=f"prompt lengths, comma-separated (default {','.join(map(str, LENGTHS))})")
    p.add_argument("--max-tokens", type=int, default=16, help="greedy tokens per request (default 16)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.exit(0 if new_event_loop().run_until_complete(run(args)) else 1)


if __name__ == "__main__":
    main()
