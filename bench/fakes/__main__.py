"""``python -m bench.fakes --registry tcp://...``: instant fake engines registered with a registry."""

from __future__ import annotations

import argparse
import asyncio

from bench.fakes.cluster import run_fakes
from common.service import run_service, setup_logging, tune_gc


async def _main(args: argparse.Namespace) -> None:
    engines = await run_fakes(args.registry, prefill=args.prefill, decode=args.decode, both=args.both,
                              model=args.model, tokens_per_output=args.tokens_per_output)
    tune_gc(20_000)  # as the gateway does: instant fakes must not pause for collections
    try:
        await asyncio.Event().wait()
    finally:
        for e in engines:
            await e.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run instant fake engines registered with a registry.")
    parser.add_argument("--registry", required=True)
    parser.add_argument("--prefill", type=int, default=1)
    parser.add_argument("--decode", type=int, default=1)
    parser.add_argument("--both", type=int, default=0)
    parser.add_argument("--model", default="fake")
    parser.add_argument("--tokens-per-output", type=int, default=1, help="decode tokens batched per TokenOutput")
    setup_logging("warning")
    raise SystemExit(run_service(_main(parser.parse_args())))
