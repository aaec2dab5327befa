"""The read-mode flow of one request: prefill leg, decode leg, retries, aborts.

Disaggregated choice::

    prefill  Generate(do_remote_decode)  -> TokenOutput(first token, kv_transfer)
             (the first token goes to the client at once)
    decode   Generate(prompt_token_ids, remote_prefill=kv_transfer) -> tokens 2.., final usage

Colocated choice: one ``Generate`` to a ``both`` instance that streams every token.

Ownership: every instance that may still hold the request (running it, or
prefill pinning its KV for decode) is in the choice's ``holders``.  Whenever a
choice ends other than normally (engine failure, timeout, client disconnect,
cancellation) each holder gets an ``Abort`` — for a prefill that already
answered, that releases its pinned blocks.  A prefill leg (or a colocated leg)
that fails before its first token is retried on another instance, at most
``max_retries`` times; a decode leg is retried only when its instance never
took the request (gone, shutting down) and before any output.

Timeouts: ``prefill_timeout_s`` for a prefill's (or colocated leg's) first
output, ``decode_first_token_timeout_s`` for decode's first output,
``stream_idle_timeout_s`` between later outputs.

Output: a choice hands each piece to an ``emit`` callback as it arrives (the
gateway collects them for a JSON response or queues them for SSE) instead of
yielding it up a stack of generators: every generator layer is paid by every
piece and every wake-up, a measurable share of a short request's cost.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

from common.errors import BusError, CallTimeout, PeerError, PeerGone
from common.messages import Generate, Instance, Role, SamplingParams, TokenLogprob, TokenOutput
from services.gateway.config import GatewayConfig
from services.gateway.engine_clients import EngineClients
from services.gateway.errors import APIError
from services.gateway.metrics import GatewayMetrics
from services.gateway.openai_protocol import ParsedRequest, Prompt
from services.gateway.router import Router

RETRY_CODES = ("overloaded", "shutting_down")


@dataclass(slots=True)
class Piece:
    """Output of one choice as it goes to the client; the last one has ``finish_reason``."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None = None


@dataclass(slots=True)
class ChoiceStats:
    """Usage of one choice: prompt and cached tokens from prefill, completion tokens from the last leg."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    first_token_at: float | None = None
    second_token_seen: bool = False


@dataclass(slots=True)
class ChoiceEvent:
    """A piece of choice ``index``, with that choice's stats."""

    index: int
    piece: Piece
    stats: ChoiceStats


Emit = Callable[[ChoiceEvent], None]
PutPiece = Callable[[Piece], None]


def _retry_before_output(e: BusError) -> bool:
    return isinstance(e, (PeerGone, CallTimeout)) or (isinstance(e, PeerError) and e.code in RETRY_CODES)


def _retry_untaken(e: BusError) -> bool:
    """A decode leg is retried only when the instance never took the request: an engine that
    answers "overloaded" has already released prefill's KV, so another decode could not read it."""
    return isinstance(e, PeerGone) or (isinstance(e, PeerError) and e.code == "shutting_down")


def leg_error(role: Role, inst: Instance, e: BusError) -> APIError:
    """The HTTP error for a leg that failed with ``e``."""
    if isinstance(e, PeerError) and e.code == "invalid_request":
        return APIError(400, e.message, param=e.param, code="invalid_value")
    if isinstance(e, CallTimeout):
        return APIError(504, f"{role} instance {inst.id} timed out: {e}", code="upstream_timeout")
    if isinstance(e, PeerError) and e.code in RETRY_CODES:
        return APIError(503, f"{role} instance {inst.id} refused the request: {e.message}", code=e.code)
    return APIError(502, f"{role} instance {inst.id} failed: {e}", code="upstream_error")


class Flow:
    def __init__(self, config: GatewayConfig, router: Router, clients: EngineClients, metrics: GatewayMetrics):
        self.config = config
        self.router = router
        self.clients = clients
        self.metrics = metrics

    # -- one choice ----------------------------------------------------------

    async def run(self, request_id: str, model: str, prompt: Prompt, sampling: SamplingParams,
                  stats: ChoiceStats, emit: Emit, index: int = 0) -> None:
        """Run choice ``index`` to its end, passing each piece to ``emit``; raises ``APIError``.
        Leaves no engine holding the request."""
        holders: dict[str, Instance] = {}

        def put(piece: Piece) -> None:
            emit(ChoiceEvent(index, piece, stats))

        try:
            if self.router.leg_for(model) == "colocated":
                await self._colocated(request_id, model, prompt, sampling, stats, holders, put)
            else:
                await self._disagg(request_id, model, prompt, sampling, stats, holders, put)
        except BaseException:
            for inst in holders.values():
                self.clients.abort(inst, request_id)
            raise

    async def _colocated(self, request_id: str, model: str, prompt: Prompt, sampling: SamplingParams,
                         stats: ChoiceStats, holders: dict[str, Instance], put: PutPiece) -> None:
        gen = Generate(request_id=request_id, sampling=sampling, **prompt.generate_fields())
        sent, first = time.perf_counter(), True
        leg = self._leg("both", model, gen, holders, self.config.prefill_timeout_s, _retry_before_output)
        async with aclosing(leg) as outputs:
            async for _, out in outputs:
                if first and out.token_ids:
                    self.metrics.prefill_leg.observe(time.perf_counter() - sent)
                    first = False
                if out.finish_reason == "abort":
                    raise APIError(503, "the engine aborted the request", code="aborted")
                if out.usage is not None:
                    stats.prompt_tokens = out.usage.prompt_tokens
                    stats.cached_tokens = out.usage.cached_tokens
                    stats.completion_tokens = out.usage.completion_tokens
                    self._observe_prefill_timings(out)
                if out.token_ids or out.finish_reason:
                    put(Piece(out.text, out.token_ids, out.logprobs, out.finish_reason))

    async def _disagg(self, request_id: str, model: str, prompt: Prompt, sampling: SamplingParams,
                      stats: ChoiceStats, holders: dict[str, Instance], put: PutPiece) -> None:
        gen = Generate(request_id=request_id, sampling=sampling, do_remote_decode=True,
                       **prompt.generate_fields())
        prompt_ids = prompt.token_ids
        prefill: Instance | None = None
        final: TokenOutput | None = None
        sent = time.perf_counter()
        leg = self._leg("prefill", model, gen, holders, self.config.prefill_timeout_s, _retry_before_output)
        async with aclosing(leg) as outputs:
            async for inst, out in outputs:
                if out.prompt_token_ids is not None:
                    prompt_ids = out.prompt_token_ids
                if out.finish_reason is None:
                    continue
                prefill, final = inst, out
                prefill_done = time.perf_counter()
                self.metrics.prefill_leg.observe(prefill_done - sent)
                if out.finish_reason == "abort":
                    raise APIError(503, f"prefill instance {inst.id} aborted the request", code="aborted")
                if out.usage is not None:
                    stats.prompt_tokens = out.usage.prompt_tokens
                    stats.cached_tokens = out.usage.cached_tokens
                stats.completion_tokens = len(out.token_ids)
                self._observe_prefill_timings(out)
                done = out.finish_reason != "remote_decode"
                put(Piece(out.text, out.token_ids, out.logprobs, out.finish_reason if done else None))
        if final is None or prefill is None:
            raise APIError(502, "prefill ended without a final output", code="upstream_error")
        if final.finish_reason != "remote_decode":
            return  # the first token ended the request: no decode leg, prefill freed its blocks
        if final.kv_transfer is None or prompt_ids is None:
            raise APIError(502, f"prefill instance {prefill.id} sent remote_decode without "
                           "kv_transfer or prompt_token_ids", code="upstream_error")
        gen = Generate(request_id=request_id, sampling=sampling, prompt_token_ids=prompt_ids,
                       remote_prefill=final.kv_transfer)
        first, sent = True, time.perf_counter()
        self.metrics.decode_dispatch.observe(sent - prefill_done)
        leg = self._leg("decode", model, gen, holders, self.config.decode_first_token_timeout_s,
                        _retry_untaken, like=prefill)
        async with aclosing(leg) as outputs:
            async for _, out in outputs:
                if first:
                    self.metrics.decode_first_output.observe(time.perf_counter() - sent)
                    self._observe_decode_timings(out.timings or {})
                first = False
                if out.finish_reason == "abort":
                    raise APIError(503, "the decode engine aborted the request", code="aborted")
                stats.completion_tokens += len(out.token_ids)
                if out.finish_reason is not None:
                    if out.usage is not None:  # counts every output token, the first included
                        stats.completion_tokens = out.usage.completion_tokens
                    holders.pop(prefill.id, None)  # decode finished: it read and released prefill's KV
                if out.token_ids or out.finish_reason:
                    put(Piece(out.text, out.token_ids, out.logprobs, out.finish_reason))

    def _observe_prefill_timings(self, out: TokenOutput) -> None:
        timings = out.timings or {}
        if "queue_s" in timings:
            self.metrics.prefill_queue.observe(timings["queue_s"])
        if "prefill_s" in timings:
            self.metrics.prefill.observe(timings["prefill_s"])

    def _observe_decode_timings(self, timings: dict[str, float]) -> None:
        for key, histogram in (("kv_transfer_s", self.metrics.kv_transfer), ("kv_bytes", self.metrics.kv_bytes),
                               ("first_decode_step_s", self.metrics.first_decode_step)):
            if key in timings:
                histogram.observe(timings[key])

    # -- one leg ---------------------------------------------------------------

    async def _leg(self, role: Role, model: str, gen: Generate, holders: dict[str, Instance],
                   first_timeout: float, retryable: Callable[[BusError], bool],
                   like: Instance | None = None) -> AsyncIterator[tuple[Instance, TokenOutput]]:
        """Run ``gen`` on an instance of ``role``, retrying on another while nothing was output."""
        tried: list[str] = []
        for attempt in range(self.config.max_retries + 1):
            inst = self.router.pick(role, model, exclude=tried, like=like)
            if inst is None:
                if attempt == 0:
                    raise APIError(503, f"no {role} instance available for model {model!r}", code="no_instance")
                raise APIError(503, f"{role} failed on {', '.join(tried)}; no other instance left",
                               code="no_instance")
            tried.append(inst.id)
            if attempt:
                self.metrics.retries.labels(role).inc()
            holders[inst.id] = inst
            output_seen = finished = False
            try:
                async with aclosing(self._stream(inst, gen, first_timeout)) as outputs:
                    async for out in outputs:
                        output_seen = output_seen or bool(out.token_ids) or out.finish_reason is not None
                        if out.finish_reason is not None:
                            finished = True
                            if out.finish_reason != "remote_decode":
                                holders.pop(inst.id, None)  # finished: the engine freed everything
                        yield inst, out
                return
            except BusError as e:
                if finished:  # the stream's end marker was lost after the final output: nothing to undo
                    return
                if not isinstance(e, PeerError) or e.code not in ("invalid_request", "kv_transfer_failed"):
                    self.router.mark_failed(inst)  # not for bad input, nor for a read from a failing prefill
                if output_seen or not retryable(e):
                    raise leg_error(role, inst, e) from e
                if attempt == self.config.max_retries:
                    code = e.code if isinstance(e, PeerError) else "upstream_unavailable"
                    raise APIError(503, f"{role} leg failed on {', '.join(tried)} (last: {e})", code=code) from e
                holders.pop(inst.id, None)
                self.clients.abort(inst, gen.request_id)
            finally:
                self.router.done(inst)

    def _stream(self, inst: Instance, gen: Generate, first_timeout: float) -> AsyncIterator[TokenOutput]:
        """The outputs of ``gen`` on ``inst``: the first within ``first_timeout``, then each within the idle timeout."""
        return self.clients.get(inst).stream(gen, idle_timeout=self.config.stream_idle_timeout_s,
                                             first_timeout=first_timeout)


# --------------------------------------------------------------------------- #
# All choices of a request
# --------------------------------------------------------------------------- #


def choice_request_id(request_id: str, index: int, total: int) -> str:
    return request_id if total == 1 else f"{request_id}-{index}"


def run_choices(flow: Flow, req: ParsedRequest, request_id: str, stats: list[ChoiceStats],
                emit: Emit) -> Awaitable[None]:
    """Every choice of ``req`` (prompt-major, ``n`` per prompt) run concurrently, each piece passed
    to ``emit`` as it arrives.

    ``stats`` receives one ``ChoiceStats`` per choice.  The first failing choice
    cancels the others and its error is raised; cancelling the await cancels all.
    """
    total = len(req.prompts) * req.n
    stats.extend(ChoiceStats() for _ in range(total))
    if total == 1:
        return flow.run(request_id, req.model, req.prompts[0], req.sampling, stats[0], emit)
    return _concurrent_choices(flow, req, request_id, stats, emit, total)


async def _concurrent_choices(flow: Flow, req: ParsedRequest, request_id: str, stats: list[ChoiceStats],
                              emit: Emit, total: int) -> None:
    tasks = [asyncio.create_task(flow.run(choice_request_id(request_id, i, total), req.model,
                                          req.prompts[i // req.n], req.choice_sampling(i % req.n), stats[i],
                                          emit, i))
             for i in range(total)]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
