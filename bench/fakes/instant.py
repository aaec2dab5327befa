"""Instant bus fakes: ``FakeEngine``s whose every leg is one canned ``TokenOutput``, for benchmarks.

The bus twin of ``http_engine`` (what the Rust routers get in ``bench/router_compare.py``): the
real bus server, registration and heartbeats, but no work per request beyond decoding the
``Generate`` and encoding one answer.  A prefill leg answers its first token with
``finish_reason="remote_decode"`` and a ``kv_transfer`` that names no pinned blocks (nothing is
leased, so nothing is released either); a decode leg answers the rest of ``max_tokens`` in one
output, finished with ``length``; a colocated leg answers all of them.  No stop strings, no
logprobs, no KV accounting: for the gateway's cost per request, not its behaviour (use
``FakeEngine`` for that).

    python -m bench.fakes.instant --registry tcp://127.0.0.1:PORT --role prefill
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

from bench.fakes.engine import FakeEngine
from common.messages import Generate, KVTransferParams, TokenOutput, Usage
from common.service import run_service, setup_logging, tune_gc

PROMPT_TOKENS = 9  # what every answer reports; the gateway passes it on as usage
TOKEN = 97  # "a"


class InstantEngine(FakeEngine):
    """A ``FakeEngine`` answering every ``Generate`` at once with one canned output."""

    def _route(self, gen: Generate) -> AsyncIterator[TokenOutput]:
        return self._answer(gen)

    async def _answer(self, gen: Generate) -> AsyncIterator[TokenOutput]:
        max_tokens = gen.sampling.max_tokens
        if gen.do_remote_decode:
            yield TokenOutput(
                request_id=gen.request_id, token_ids=[TOKEN], text=chr(TOKEN), finish_reason="remote_decode",
                prompt_token_ids=[TOKEN] * PROMPT_TOKENS, usage=Usage(PROMPT_TOKENS, 1, 0),
                kv_transfer=KVTransferParams(engine_id=self.id, kv_endpoint=self.kv_server.endpoint,
                                             transfer_id=gen.request_id, block_ids=[], num_tokens=PROMPT_TOKENS,
                                             first_token_id=TOKEN, lease_expiry=0.0))
            return
        tokens = max_tokens - 1 if gen.remote_prefill is not None else max_tokens
        yield TokenOutput(request_id=gen.request_id, token_ids=[TOKEN] * tokens, text=chr(TOKEN) * tokens,
                          finish_reason="length", usage=Usage(PROMPT_TOKENS, max_tokens, 0))


async def _main(args: argparse.Namespace) -> None:
    engine = InstantEngine(args.role, args.registry, model=args.model)
    await engine.start()
    tune_gc(20_000)
    try:
        await asyncio.Event().wait()
    finally:
        await engine.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run one instant fake engine registered with a registry.")
    parser.add_argument("--registry", required=True)
    parser.add_argument("--role", choices=("prefill", "decode", "both"), required=True)
    parser.add_argument("--model", default="fake")
    setup_logging("warning")
    raise SystemExit(run_service(_main(parser.parse_args())))
