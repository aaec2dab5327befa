"""Test-only helpers: waiting on a condition with a deadline; a transfer peer in another process and the
ranges reading its blocks.

The service processes and the engine driver that tests share with the benchmarks
live in ``bench/processes.py`` and ``bench/engine_driver.py``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import openai

from common.kv_transfer.ranges import BlockTable, ByteRanges, KVLayout, token_ranges

if TYPE_CHECKING:
    from common.engine.kv_cache import KVCache

REPO = Path(__file__).resolve().parents[1]


async def eventually(predicate, timeout: float = 5.0, interval: float = 0.02) -> None:
    """Wait until ``predicate()`` (sync or async) is true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout:g} s")
        await asyncio.sleep(interval)


async def gateway_serving(client, timeout: float = 60.0) -> None:
    """Wait until the gateway behind ``client`` (an ``openai.AsyncOpenAI``) lists a model."""

    async def serving() -> bool:
        try:
            return bool((await client.models.list()).data)
        except openai.APIConnectionError:
            return False

    await eventually(serving, timeout=timeout, interval=0.1)


class Clock:
    """A clock a test moves by hand (``clock.now += 5``), for the pure state that takes one."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class PeerProcess:
    """``python -m <module> <args>`` that prints one JSON line once ready and runs until its stdin closes
    (a transfer peer in another process); ``with PeerProcess(...) as info:`` yields that line."""

    def __init__(self, module: str, *args: str, ready_timeout_s: float = 60.0):
        self.argv = [sys.executable, "-m", module, *args]
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> dict:
        self.proc = subprocess.Popen(self.argv, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                         p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)})
        ready, _, _ = select.select([self.proc.stdout], [], [], self.ready_timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            raise AssertionError(f"{self.argv[2]} not ready within {self.ready_timeout_s:g} s "
                                 f"(exit status {self.proc.wait()})")
        return json.loads(line)

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Close its stdin and wait for it to exit (killed after 20 s)."""
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def peer_block_ranges(kv: KVCache, peer_base: int, local_ids: list[int], remote_ids: list[int]) -> ByteRanges:
    """Ranges reading whole blocks ``remote_ids`` of a peer's KV cache (``kv``'s geometry, based at
    ``peer_base``) into ``local_ids`` of ``kv``, every head."""
    heads = kv.num_kv_heads
    local = BlockTable(KVLayout.of(kv), kv.block_size, local_ids, 0, heads)
    remote = BlockTable(KVLayout(peer_base, kv.block_bytes, kv.num_blocks), kv.block_size, remote_ids, 0, heads)
    return token_ranges(local, remote, heads=range(heads), num_tokens=len(local_ids) * kv.block_size)
