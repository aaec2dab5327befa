"""Life cycle of a push-mode request in the prefill server (``Generate(do_remote_decode, push_to=target)``).

1. The engine computes the prompt under a fresh transfer id (its blocks pinned under it at the
   finish, as in read mode) with a ``PushJob`` as the sequence's ``KVPush``: after every step the
   engine thread hands the job the window of prompt tokens whose KV just landed (per chunk under
   chunked prefill; on CUDA with an event recorded after the step's kernels).
2. The job writes the windows in order (``KVWriter.write``, which confirms decode still holds its
   blocks before each write, the last one included), waiting for each window's event first, while the
   engine computes the next chunk.
3. The final output (``remote_decode``): the job writes what is left and waits until every rank wrote
   every window (quorum); the pin is released, the first token goes to the gateway and, at once,
   decode gets ``PushDone`` and starts decoding.
4. A failed write (decode gone, or its lease ended) aborts the engine request at once and fails
   the leg (``kv_transfer_failed``).  An abort or a cancelled leg stops the job once the write in
   flight ended.  Whatever ends the leg early, decode is told that this writer stopped
   (``ReleaseKV``) and the pin is released: prefill never frees anything it does not own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import torch

from common.bus.endpoints import endpoint_problem
from common.engine_service import EngineService
from common.errors import BusError, HandshakeError, KVTransferError, PeerError
from common.kv_transfer.writer import KVWriter
from common.messages import Generate, PushTarget, TokenOutput
from common.tasks import BackgroundTasks
from services.prefill.handoff import new_transfer_id

log = logging.getLogger(__name__)

Window = tuple[int, int, list[int], "torch.cuda.Event | None"]


class PushJob:
    """One request's writes, in the order the engine computed them (the request's ``KVPush``)."""

    def __init__(self, writer: KVWriter, target: PushTarget, on_failure: Callable[[], None]):
        """``on_failure`` is called (on the event loop) when a write fails: stop computing."""
        self.writer, self.target = writer, target
        self.loop = asyncio.get_running_loop()
        self.windows: asyncio.Queue[Window | None] = asyncio.Queue()
        self.bytes = self.ranges = 0
        self.seconds = 0.0
        self.task = asyncio.create_task(self._run())
        self.task.add_done_callback(lambda t: on_failure() if not t.cancelled() and t.exception() else None)

    def computed(self, start: int, end: int, block_ids: list[int], ready: torch.cuda.Event | None) -> None:
        """Engine thread: queue a window (``common.engine.sequence.KVPush``)."""
        self.loop.call_soon_threadsafe(self.windows.put_nowait, (start, end, block_ids, ready))

    async def finish(self) -> None:
        """Wait until every queued window is written; raises the first write's failure."""
        self.windows.put_nowait(None)
        await asyncio.shield(self.task)

    async def stop(self) -> None:
        """Stop after the write in flight (a started backend copy is never abandoned)."""
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    @property
    def failure(self) -> BaseException | None:
        return self.task.exception() if self.task.done() and not self.task.cancelled() else None

    async def _run(self) -> None:
        while (window := await self.windows.get()) is not None:
            start, end, block_ids, ready = window
            if ready is not None:
                await self.loop.run_in_executor(None, ready.synchronize)
            stats = await self.writer.write(self.target, start, end, block_ids)
            self.bytes += stats.bytes
            self.ranges += stats.num_ranges
            self.seconds += stats.seconds


class PrefillPush:
    """Serves push-mode prefill legs for a ``PrefillRole``."""

    def __init__(self, service: EngineService):
        self.service = s = service
        self.writer = KVWriter(s.kv_ranks, s.instance_id, s.fingerprint, s.config, s.transports.chosen)
        self._background = BackgroundTasks()

    async def generate(self, msg: Generate, target: PushTarget) -> AsyncIterator[TokenOutput]:
        request_id, s = msg.request_id, self.service
        problem = endpoint_problem(target.kv_endpoint)
        if problem is not None:  # refused before any socket exists
            raise PeerError("invalid_request", f"push_to.kv_endpoint: {problem}", "push_to.kv_endpoint")
        prompt_ids = s.prompt_token_ids(msg)
        if target.num_tokens != len(prompt_ids):
            raise PeerError("invalid_request", f"push_to: decode holds blocks for {target.num_tokens} tokens, the "
                            f"prompt has {len(prompt_ids)}", "push_to")
        transfer_id = new_transfer_id()
        job = PushJob(self.writer, target, lambda: self._background.spawn(s.engine.abort(request_id)))
        finished = False
        try:
            outputs = s.local_outputs(request_id, prompt_ids, msg.sampling, pin_for_transfer=transfer_id, push=job)
            async for token in s.tokens(request_id, prompt_ids, outputs):
                if token.finish_reason is None:
                    yield token
                    continue
                if job.failure is not None:
                    raise PeerError("kv_transfer_failed", f"pushing KV to {target.engine_id} failed: {job.failure}")
                if token.finish_reason == "remote_decode":
                    await self._complete(job, token)
                    self._done(target, token)
                    finished = True
                yield token
        finally:
            if not finished:
                await job.stop()
                self.writer.abandon(target)
            await s.engine.release_transfer(transfer_id)  # nothing pinned (an early end): nothing happens

    async def _complete(self, job: PushJob, token: TokenOutput) -> None:
        """Wait for the last writes (the request's KV is pinned meanwhile) and time them."""
        started = time.monotonic()
        try:
            await job.finish()
        except (KVTransferError, HandshakeError) as e:
            raise PeerError("kv_transfer_failed", f"pushing KV to {job.target.engine_id} failed: {e}") from e
        token.timings = {**(token.timings or {}), "kv_push_tail_s": time.monotonic() - started,
                         "kv_push_s": job.seconds, "kv_bytes": float(job.bytes), "kv_ranges": float(job.ranges)}

    def _done(self, target: PushTarget, token: TokenOutput) -> None:
        """``PushDone``, queued now: it leaves with the token (decode starts as the client gets it); its
        answer is awaited in the background."""
        try:
            answer = self.writer.done(target, token.token_ids[0])
        except BusError as e:
            answer = asyncio.get_running_loop().create_future()
            answer.set_exception(e)
        self._background.spawn(self._answered(target, answer))

    async def _answered(self, target: PushTarget, answer: asyncio.Future) -> None:
        try:
            await answer
        except Exception as e:  # decode fails the request itself (its lease expires)
            log.warning("PushDone %s to %s failed: %s", target.transfer_id, target.engine_id, e)

    async def shutdown(self) -> None:
        await self._background.wait()
        await self.writer.close()
