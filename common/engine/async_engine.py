"""``AsyncEngine``: an ``LLMEngine`` stepped on one dedicated thread, driven from asyncio.

Every call is a command queued to the engine thread and applied between steps,
so the engine itself stays single-threaded and the event loop never runs a
forward pass.  Outputs reach each request's ``asyncio.Queue`` through
``loop.call_soon_threadsafe``.  With nothing schedulable (including when every
request waits for remote KV) the thread sleeps on an event.

A call made while the engine thread sleeps with no command queued ahead of it
runs on the event loop at once (``_turn``: whoever holds it may touch ``core``;
the engine thread holds it but while asleep): a request's block allocation then
costs no hop to the engine thread and back (~0.4 ms on a CPU host), and the
thread is woken only when the call left it work.  Host-side commands only: a
KV load from the host tier always goes to the thread.

Remote requests that find too few free blocks queue (FIFO) until blocks free;
bound the wait with ``asyncio.wait_for`` (a cancelled wait drops the request).

Progress: every ``progress_interval_s`` the engine thread sends each request that
waits in the scheduler (queued, preempted, or still computing its prompt) an
empty output, so its consumer (in the end the gateway, whose leg timeouts
measure silence) can tell a request waiting its turn from a dead engine: a
thread stuck in a step, or gone, sends none.

Slow steps: a step longer than ``slow_step_log_s`` (0: never) logs a warning with its length and the
engine's counts after it, so a stall in serving (a kernel compiled mid-run, a collector pause, a host
starved of CPU) has a time and a place in the engine's log.

Under tensor parallelism a worker rank that exits wakes the thread, which then fails every
request with ``TensorParallelError`` (as a failed step does); the thread stops the other
ranks (``LLMEngine.close``) on its way out.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from common.engine.engine import LLMEngine
from common.engine.stats import StepStats
from common.engine.sequence import InvalidRequest, KVPush, NoFreeBlocks, RemoteAllocation, RemoteRequest, RequestOutput
from common.errors import PdserveError
from common.messages import SamplingParams

logger = logging.getLogger(__name__)


class EngineDead(PdserveError):
    """The engine thread stopped (shut down, or a step raised); no request can run."""


class RequestAborted(PdserveError):
    """The request was aborted before it got its KV blocks."""


@dataclass
class _Command:
    """``fn`` to run on the engine thread; its result or exception resolves ``future`` on ``loop``."""

    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop | None = None  # None: fire and forget
    future: asyncio.Future | None = None
    waits_for_blocks: str | None = None  # request id: on NoFreeBlocks, retry after every step
    inline: bool = False  # applied on the event loop's thread: settle the future at once

    def resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        if self.loop is None or self.future is None:
            if error is not None:
                logger.warning("engine command failed: %r", error)
            return
        future = self.future

        def settle() -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        if self.inline:
            settle()
        else:
            self.loop.call_soon_threadsafe(settle)


PROGRESS_INTERVAL_S = 1.0


class AsyncEngine:
    """``core`` (the ``LLMEngine``) is touched only by the engine thread, between steps."""

    def __init__(self, core: LLMEngine, progress_interval_s: float = PROGRESS_INTERVAL_S, slow_step_log_s: float = 0.0):
        self.core = core
        self.progress_interval_s = progress_interval_s
        self.slow_step_log_s = slow_step_log_s
        self._next_progress = 0.0  # time.monotonic() of the next progress outputs
        self._commands: deque[_Command] = deque()
        self._waiting_blocks: deque[tuple[str, _Command]] = deque()  # (request id, its add_remote)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]] = {}
        self._wake = threading.Event()
        self._turn = threading.Lock()  # held by whoever touches ``core``: the engine thread but while asleep
        self._stopping = False
        self._dead: BaseException | None = None
        # Published after every command batch (by whichever thread ran it) and step, before that step's
        # outputs are delivered: whoever saw an output reads stats at least as new as it.  Never waited for.
        self.latest_stats: StepStats = core.stats()
        if core.workers is not None:
            core.workers.on_exit = self._wake.set
        self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ API (event loop side)

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        *,
        pin_for_transfer: str | None = None,
        push: KVPush | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its outputs until the final one (``push``: ``LLMEngine.add_request``).
        Raises ``InvalidRequest`` at the start; cancelling the consumer (or closing the iterator early)
        aborts the request."""
        await self._start(
            request_id,
            lambda: self.core.add_request(request_id, prompt_token_ids, sampling, pin_for_transfer=pin_for_transfer,
                                          push=push),
        )
        async for out in self.stream(request_id):
            yield out

    async def add_remote(self, remote: RemoteRequest) -> RemoteAllocation:
        """Allocate blocks for a remote prefill's KV, waiting for free blocks if needed; then read
        the KV, call ``finish_remote_kv`` and consume ``stream(remote.request_id)``.  Push mode (no first
        token yet: a whole prefill runs before the KV lands) queues the prompt's hashing for the engine
        thread meanwhile (``LLMEngine.hash_prompt``), after the caller has the allocation."""
        allocation = await self._start(
            remote.request_id, lambda: self.core.add_remote_request(remote), waits_for_blocks=remote.request_id
        )
        if remote.first_token_id is None:
            self._post(lambda: self.core.hash_prompt(remote.request_id))
        return allocation

    async def stream(self, request_id: str) -> AsyncIterator[RequestOutput]:
        """Outputs of a request added by ``generate`` or ``add_remote``, until the final one."""
        entry = self._streams.get(request_id)
        if entry is None:
            raise KeyError(f"no output stream for request {request_id!r}")
        queue = entry[1]
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            self._streams.pop(request_id, None)
            if not finished and not self._stopping:
                self._post(lambda: self._abort(request_id))

    def discard(self, request_id: str) -> None:
        """Drop a request whose ``stream`` will never be consumed (its caller was cancelled or
        failed first): close its output stream and abort it, without waiting."""
        self._streams.pop(request_id, None)
        if not self._stopping:
            self._post(lambda: self._abort(request_id))

    @property
    def failed(self) -> BaseException | None:
        """Why the engine thread stopped on an error (a step raised), or None."""
        return self._dead

    def finish_remote_kv(self, request_id: str, ok: bool) -> None:
        """Hand a remote request back (``LLMEngine.finish_remote_kv``) without waiting for the engine thread,
        which applies it at its next turn and steps at once; its outcome arrives on ``stream``."""
        self._post(lambda: self.core.finish_remote_kv(request_id, ok))

    def finish_pushed(self, request_id: str, first_token_id: int) -> asyncio.Future[bool]:
        """Push mode: the prompt's KV landed; decode from the prefill's ``first_token_id``.  Applied before this
        returns when the engine thread sleeps (``_call``), so a caller need not be the request's consumer."""
        return self._call(lambda: _finish_pushed(self.core, request_id, first_token_id))

    async def load_from_host(self, request_id: str, start: int) -> int:
        """``OffloadTier.load_remote`` (the engine has ``--kv-offload-cpu-gib``)."""
        return await self._call(lambda: self.core.offload.load_remote(self.core.requests.get(request_id), start),
                                inline=False)  # device copies: never on the event loop

    def store_to_host(self, request_id: str) -> None:
        """``OffloadTier.store_seq``, without waiting (the engine has ``--kv-offload-cpu-gib``)."""
        self._post(lambda: self.core.offload.store_seq(self.core.requests.get(request_id)))

    async def release_transfer(self, transfer_id: str) -> bool:
        return await self._call(lambda: self.core.release_transfer(transfer_id))

    async def abort(self, request_id: str) -> bool:
        return await self._call(lambda: self._abort(request_id))

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Abort every request, stop the thread and wait up to ``timeout`` seconds for it."""
        if not self._stopping:
            self._stopping = True
            self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout)
        if self._thread.is_alive():
            logger.warning("engine thread still running %.1fs after shutdown", timeout)
            return
        while self._commands:  # queued by a call racing with shutdown
            self._commands.popleft().resolve(error=EngineDead("engine shut down"))

    # ------------------------------------------------------------------ plumbing

    async def _start(self, request_id: str, add: Callable[[], Any], waits_for_blocks: str | None = None) -> Any:
        """Open the request's output stream, then run its ``add`` command; a cancelled add is aborted."""
        if request_id in self._streams:
            raise ValueError(f"request {request_id!r} already has an output stream")
        self._streams[request_id] = (asyncio.get_running_loop(), asyncio.Queue())
        try:
            return await self._call(add, waits_for_blocks)
        except asyncio.CancelledError:
            self._streams.pop(request_id, None)
            if not self._stopping:
                self._post(lambda: self._abort(request_id))  # the add may still land after us
            raise
        except BaseException:
            self._streams.pop(request_id, None)
            raise

    def _call(self, fn: Callable[[], Any], waits_for_blocks: str | None = None, inline: bool = True
              ) -> asyncio.Future:
        """Run ``fn`` on the engine thread, or here and now (``inline``) if it sleeps with nothing queued."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if self._dead is not None or self._stopping:
            future.set_exception(EngineDead(f"engine stopped: {self._dead or 'shut down'}"))
            return future
        if inline and not self._commands and self._turn.acquire(blocking=False):
            try:  # the engine thread sleeps (or has not started its next turn): it cannot touch core now
                self._apply(_Command(fn, loop, future, waits_for_blocks, inline=True))
                self._retry_waiting_blocks()
                self.latest_stats = self.core.stats()
                idle = not self.core.has_work()
            finally:
                self._turn.release()
            if not idle:
                self._wake.set()
            return future
        self._commands.append(_Command(fn, loop, future, waits_for_blocks))
        self._wake.set()
        return future

    def _post(self, fn: Callable[[], Any]) -> None:
        """Queue ``fn`` for the engine thread without waiting (callable from any thread)."""
        self._commands.append(_Command(fn))
        self._wake.set()

    def _abort(self, request_id: str) -> bool:
        """Engine thread: abort a request, including one still waiting for free blocks."""
        for entry in self._waiting_blocks:
            if entry[0] == request_id:
                self._waiting_blocks.remove(entry)
                entry[1].resolve(error=RequestAborted(f"request {request_id!r} aborted while waiting for KV blocks"))
                return True
        return self.core.abort(request_id)

    def _run(self) -> None:
        self._turn.acquire()  # never released on the way out: nothing may touch core once it closes
        try:
            while not self._stopping:
                self._wake.clear()
                self.core.check_health()
                self._apply_commands()
                self._retry_waiting_blocks()
                self.latest_stats = self.core.stats()
                if self.core.has_work():
                    started = time.monotonic()
                    outputs = self.core.step()
                    self.latest_stats = self.core.stats()
                    self._check_slow(time.monotonic() - started)
                    self._deliver(outputs)
                    self._progress()
                elif not self._commands:
                    self._turn.release()  # calls may run on the event loop meanwhile
                    try:
                        self._wake.wait()
                    finally:
                        self._turn.acquire()
        except BaseException as e:  # a step failed: every request learns it, later calls raise EngineDead
            logger.exception("engine step failed; stopping the engine")
            self._dead = e
            self._fail_all(f"engine failed: {e!r}")
        else:
            self._fail_all("engine shut down")
        finally:
            self.core.close()

    def _apply_commands(self) -> None:
        while self._commands:
            self._apply(self._commands.popleft())

    def _apply(self, command: _Command) -> None:
        """Holding ``_turn``: run one command; a remote allocation without free blocks waits for them."""
        try:
            result = command.fn()
        except NoFreeBlocks as e:
            if command.waits_for_blocks is None:
                command.resolve(error=e)
            else:
                command.inline = False
                self._waiting_blocks.append((command.waits_for_blocks, command))
            return
        except Exception as e:  # typed request errors go back to the caller
            command.resolve(error=e)
            return
        command.resolve(result)

    def _retry_waiting_blocks(self) -> None:
        while self._waiting_blocks:
            _, command = self._waiting_blocks[0]
            try:
                result = command.fn()
            except NoFreeBlocks:
                return
            except Exception as e:
                result, error = None, e
            else:
                error = None
            self._waiting_blocks.popleft()
            command.resolve(result, error)

    def _check_slow(self, seconds: float) -> None:
        if self.slow_step_log_s and seconds > self.slow_step_log_s:
            stats = self.latest_stats
            logger.warning("engine step took %.3f s (over %.3f s); after it: %d running, %d waiting, %d waiting for "
                           "remote KV, KV blocks %d used (%d pinned) of %d", seconds, self.slow_step_log_s,
                           stats.running, stats.waiting, stats.waiting_for_remote_kvs, stats.kv_blocks_used,
                           stats.kv_blocks_pinned, stats.kv_blocks_total)  # fmt: skip

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            entry = self._streams.get(out.request_id)
            if entry is not None:
                loop, queue = entry
                loop.call_soon_threadsafe(queue.put_nowait, out)

    def _progress(self) -> None:
        """Engine thread, after a step: every ``progress_interval_s`` an empty output to each request
        waiting in the scheduler or computing its prompt (more than one token left to compute)."""
        now = time.monotonic()
        if now < self._next_progress:
            return
        self._next_progress = now + self.progress_interval_s
        scheduler = self.core.scheduler
        waiting = [*scheduler.waiting, *(s for s in scheduler.running if s.num_tokens - s.num_computed_tokens > 1)]
        self._deliver([RequestOutput(s.request_id, [], "") for s in waiting])

    def _fail_all(self, reason: str) -> None:
        """Engine thread, on the way out: end every stream and pending call."""
        outputs: list[RequestOutput] = []
        if self._dead is None:
            for request_id in list(self.core.requests):
                self.core.abort(request_id)
            outputs = self.core.step()
        self._deliver(outputs)
        for request_id, (loop, queue) in list(self._streams.items()):
            if not any(o.request_id == request_id and o.finished for o in outputs):
                reason_code = "abort" if self._dead is None else "error"
                out = RequestOutput(request_id, [], "", finish_reason=reason_code, error=reason)
                loop.call_soon_threadsafe(queue.put_nowait, out)
        for command in [*self._commands, *(c for _, c in self._waiting_blocks)]:
            command.resolve(error=EngineDead(reason))
        self._commands.clear()
        self._waiting_blocks.clear()


def _finish_pushed(core: LLMEngine, request_id: str, first_token_id: int) -> bool:
    """Engine thread: the pushed KV of a request allocated without its first token landed; it decodes from
    ``first_token_id`` (``LLMEngine.finish_remote_kv``).  False if the request is gone."""
    seq = core.requests.get(request_id)
    if seq is None:
        return False
    if not 0 <= first_token_id < core.model_config.vocab_size:
        raise InvalidRequest(f"first_token_id {first_token_id} is outside the vocabulary", "first_token_id")
    seq.remote_first_token = first_token_id
    return core.finish_remote_kv(request_id, True)
