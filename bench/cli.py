"""The command line the measuring bench modules share: ``bench_parser`` (the module's docstring as help, and
``--json PATH``) and ``run_bench`` (run the measurement on a fresh event loop, print its report, write the
result to ``--json``).  A module's ``main`` is then its flags, its checks of them and one ``run_bench`` call."""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

from common.service import new_event_loop


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser whose help is ``doc`` as written, with ``--json PATH``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the result as JSON to this file")
    return p


def run_bench(args: argparse.Namespace, run: Callable[[argparse.Namespace], Awaitable[dict]],
              report: Callable[[dict], str]) -> dict:
    """``run(args)`` on a new event loop (closed afterwards); prints ``report(result)``, writes the result to
    ``args.json`` when set, and returns it."""
    loop = new_event_loop()
    try:
        result = loop.run_until_complete(run(args))
    finally:
        loop.close()
    print(report(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result
