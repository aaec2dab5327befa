"""The periodic stats line every engine logs at info level (vLLM's "Avg prompt throughput ..." line).

Every ``--stats-interval-s`` (0: never): prompt and generation throughput over the interval,
running and waiting requests, KV cache usage, and for the P/D roles the blocks pinned for a
reader and the KV transfers in progress.  A line is logged only while work is in flight or
something changed since the last line, so an idle engine stays quiet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from common.engine.engine import StepStats

log = logging.getLogger(__name__)


class StatsLog:
    """Token counters fed by the service (``count_prompt``, ``count_generated``) and the line's task."""

    def __init__(self, name: str, stats: Callable[[], StepStats], transfers: Callable[[], int] | None,
                 interval_s: float):
        """``transfers``: the role's transfers in progress (None for a role that moves no KV)."""
        self.name = name
        self.stats = stats
        self.transfers = transfers
        self.interval_s = interval_s
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self._last_state: tuple | None = None
        self._last_at = time.monotonic()
        self._task: asyncio.Task | None = None

    def count_prompt(self, n: int) -> None:
        self.prompt_tokens += n

    def count_generated(self, n: int) -> None:
        self.generated_tokens += n

    def start(self) -> None:
        if self.interval_s > 0:
            self._last_at = time.monotonic()
            self._task = asyncio.create_task(self._run(), name=f"stats-log-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            line = self.line()
            if line is not None:
                log.info("%s", line)

    def line(self) -> str | None:
        """The interval's line (and the counters restart), or None when idle and unchanged."""
        now = time.monotonic()
        elapsed = max(now - self._last_at, 1e-9)
        s = self.stats()
        transfers = self.transfers() if self.transfers is not None else 0
        state = (s.running, s.waiting + s.waiting_for_remote_kvs, s.kv_blocks_used, s.kv_blocks_pinned, transfers)
        busy = self.prompt_tokens or self.generated_tokens or s.running or state[1] or transfers
        if not busy and state == self._last_state:
            return None
        usage = 100.0 * s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0
        text = (f"{self.name}: prompt throughput {self.prompt_tokens / elapsed:.1f} tokens/s, "
                f"generation throughput {self.generated_tokens / elapsed:.1f} tokens/s, running {s.running} reqs, "
                f"waiting {state[1]} reqs, KV cache usage {usage:.1f}%")
        if self.transfers is not None:
            text += f", pinned {s.kv_blocks_pinned} blocks, KV transfers {transfers}"
        self.prompt_tokens = self.generated_tokens = 0
        self._last_at, self._last_state = now, state
        return text
