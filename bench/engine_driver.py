"""An engine service as a client sees it: requests by engine name over the bus, for tests and benchmarks.

``EngineDriver`` runs colocated reference requests, the two P/D legs as the
gateway sends them, reads stats and polls until an engine is idle.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time

from common.bus import BusClient
from common.client_pool import ClientPool
from common.messages import (
    EngineStats,
    Generate,
    GetStats,
    KVTransferParams,
    PushTarget,
    SamplingParams,
    TokenOutput,
)

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def prompt_ids(n: int, seed: int) -> list[int]:
    """``n`` token ids of the demo model's vocabulary (no BOS/EOS), distinct per seed."""
    rng = random.Random(seed)
    return [rng.randrange(3, 330) for _ in range(n)]


def tokens(outputs: list[TokenOutput]) -> list[int]:
    """Every token id of a request's outputs, in order."""
    return [t for out in outputs for t in out.token_ids]


class EngineDriver:
    """Drives engines by name (``endpoints``: name -> request endpoint, may grow); ``close()`` it."""

    def __init__(self, endpoints: dict[str, str], timeout_s: float = 60.0):
        self.endpoints = dict(endpoints)
        self._clients = ClientPool(name="engine-driver", timeout=timeout_s)
        self._ids = itertools.count()

    def client(self, name: str) -> BusClient:
        """The bus client of engine ``name``."""
        return self._clients.get(self.endpoints[name])

    async def close(self) -> None:
        await self._clients.close()

    async def run(self, name: str, msg: Generate) -> list[TokenOutput]:
        return [out async for out in self.client(name).stream(msg)]

    async def reference(self, ids: list[int], sampling: SamplingParams = GREEDY, name: str = "both") -> list[int]:
        """Colocated output: what every P/D run must equal."""
        return tokens(await self.run(name, Generate(f"ref-{next(self._ids)}", sampling, prompt_token_ids=ids)))

    async def prefill_leg(self, name: str, rid: str, ids: list[int], sampling: SamplingParams = GREEDY
                          ) -> list[TokenOutput]:
        return await self.run(name, Generate(rid, sampling, prompt_token_ids=ids, do_remote_decode=True))

    async def decode_leg(self, name: str, rid: str, ids: list[int], params: KVTransferParams,
                         sampling: SamplingParams = GREEDY) -> list[TokenOutput]:
        return await self.run(name, Generate(rid, sampling, prompt_token_ids=ids, remote_prefill=params))

    async def pd(self, rid: str, ids: list[int], sampling: SamplingParams = GREEDY, *, prefill: str = "prefill",
                 decode: str = "decode") -> tuple[list[TokenOutput], list[TokenOutput]]:
        """Both legs as the gateway runs them: the prefill's params go to the decode."""
        pre = await self.prefill_leg(prefill, rid, ids, sampling)
        return pre, await self.decode_leg(decode, rid, ids, pre[-1].kv_transfer, sampling)

    async def push_registration(self, name: str, rid: str, ids: list[int], sampling: SamplingParams = GREEDY
                                ) -> tuple[PushTarget, asyncio.Task[list[TokenOutput]]]:
        """Push mode: decode ``name``'s registration of ``ids``, and the task collecting its later outputs."""
        outputs = aiter(self.client(name).stream(Generate(rid, sampling, prompt_token_ids=ids, await_push=True)))
        first = await anext(outputs)
        if first.push_target is None:
            raise AssertionError(f"{name} answered await_push with {first}")

        async def rest() -> list[TokenOutput]:
            return [out async for out in outputs]

        return first.push_target, asyncio.create_task(rest())

    async def push_pd(self, rid: str, ids: list[int], sampling: SamplingParams = GREEDY, *, prefill: str = "prefill",
                      decode: str = "decode") -> tuple[list[TokenOutput], list[TokenOutput]]:
        """Both push-mode legs as the gateway runs them: decode registers, prefill pushes into its blocks."""
        target, decoded = await self.push_registration(decode, rid, ids, sampling)
        try:
            pre = await self.run(prefill, Generate(rid, sampling, prompt_token_ids=ids, do_remote_decode=True,
                                                   push_to=target))
        except BaseException:
            decoded.cancel()
            raise
        return pre, await decoded

    async def stats(self, name: str) -> EngineStats:
        reply = await self.client(name).call(GetStats())
        assert isinstance(reply, EngineStats)
        return reply

    async def wait_idle(self, *names: str, timeout_s: float = 15.0) -> None:
        """Poll GetStats until no request runs or waits and no block is used or pinned (all engines
        when no name is given)."""
        for name in names or tuple(self.endpoints):
            deadline = time.monotonic() + timeout_s
            while True:
                s = await self.stats(name)
                load = s.load
                if (load.running, load.waiting, load.kv_blocks_used, load.kv_blocks_pinned, s.num_transfers_active) \
                        == (0, 0, 0, 0, 0):
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"{name} not idle after {timeout_s} s: {s}")
                await asyncio.sleep(0.05)
