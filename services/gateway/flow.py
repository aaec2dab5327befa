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

Execution: a choice is a small state machine driven by the bus (``Leg`` and
``ChoiceRun`` hear each reply the moment the bus reader takes it in, through
``BusClient.request``), not a coroutine: the next leg is sent from the reply's
callback and each piece is handed to an ``emit`` callback (the gateway collects
them for a JSON response or queues them for SSE).  The request's own task sleeps
until every choice is done, so a request costs one task wake-up, not one per
reply through a stack of generators — a large share of a short request's cost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable

from common.bus import FLAG_END, FLAG_ITEM, BusClient
from common.errors import BusError, CallTimeout, PeerError, PeerGone
from common.messages import Generate, Instance, Role, SamplingParams, TokenLogprob, TokenOutput
from services.gateway.config import GatewayConfig
from services.gateway.engine_clients import EngineClients
from services.gateway.errors import APIError
from services.gateway.metrics import GatewayMetrics
from services.gateway.openai_protocol import ParsedRequest, Prompt
from services.gateway.router import Router

log = logging.getLogger(__name__)

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
    """What every choice of every request shares: config, router, engine clients, metrics."""

    def __init__(self, config: GatewayConfig, router: Router, clients: EngineClients, metrics: GatewayMetrics):
        self.config = config
        self.router = router
        self.clients = clients
        self.metrics = metrics

    def observe_prefill_timings(self, out: TokenOutput) -> None:
        timings = out.timings or {}
        if "queue_s" in timings:
            self.metrics.prefill_queue.observe(timings["queue_s"])
        if "prefill_s" in timings:
            self.metrics.prefill.observe(timings["prefill_s"])

    def observe_decode_timings(self, out: TokenOutput) -> None:
        timings = out.timings or {}
        for key, histogram in (("kv_transfer_s", self.metrics.kv_transfer), ("kv_bytes", self.metrics.kv_bytes),
                               ("first_decode_step_s", self.metrics.first_decode_step)):
            if key in timings:
                histogram.observe(timings[key])


# --------------------------------------------------------------------------- #
# One leg
# --------------------------------------------------------------------------- #


class Leg:
    """``gen`` on an instance of ``role``, retried on another one while nothing was output.

    ``on_output(inst, out)`` hears each ``TokenOutput`` as it arrives (raising
    ``APIError`` ends the leg with it); ``on_end(error)`` is called once, with
    None when the engine's stream ended, else the ``APIError``.  ``stop()`` ends
    it silently (cancelling the request on the engine).  Every instance the leg
    sends to is added to ``holders`` until it finished with the request.
    """

    __slots__ = ("flow", "role", "model", "gen", "holders", "first_timeout", "retryable", "like", "on_output",
                 "on_end", "tried", "inst", "client", "req_id", "timer", "output_seen", "finished", "ended")

    def __init__(self, flow: Flow, role: Role, model: str, gen: Generate, holders: dict[str, Instance],
                 first_timeout: float, retryable: Callable[[BusError], bool],
                 on_output: Callable[[Instance, TokenOutput], None], on_end: Callable[[APIError | None], None],
                 like: Instance | None = None):
        self.flow, self.role, self.model, self.gen, self.holders = flow, role, model, gen, holders
        self.first_timeout, self.retryable, self.like = first_timeout, retryable, like
        self.on_output, self.on_end = on_output, on_end
        self.tried: list[str] = []
        self.inst: Instance | None = None  # the instance of the attempt in flight, None between attempts
        self.client: BusClient | None = None
        self.req_id = 0
        self.timer: asyncio.TimerHandle | None = None
        self.output_seen = self.finished = self.ended = False

    def start(self) -> None:
        inst = self.flow.router.pick(self.role, self.model, exclude=self.tried, like=self.like)
        if inst is None:
            if not self.tried:
                self._end(APIError(503, f"no {self.role} instance available for model {self.model!r}",
                                   code="no_instance"))
            else:
                self._end(APIError(503, f"{self.role} failed on {', '.join(self.tried)}; no other instance left",
                                   code="no_instance"))
            return
        if self.tried:
            self.flow.metrics.retries.labels(self.role).inc()
        self.tried.append(inst.id)
        self.holders[inst.id] = inst
        self.inst, self.output_seen, self.finished = inst, False, False
        self.client = self.flow.clients.get(inst)
        self.req_id = 0  # no request of this attempt yet (ids start at 1)
        try:
            self.req_id = self.client.request(self.gen, self._on_reply)
        except BusError as e:  # the client was closed: the instance just left
            self._failed(e)
            return
        self._arm(self.first_timeout)

    def stop(self) -> None:
        """End silently: the engine is told to stop (the caller aborts the holders)."""
        self.ended = True
        self._close(cancel=True)

    # -- internals ---------------------------------------------------------

    def _arm(self, timeout: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(timeout, self._timed_out, timeout)

    def _timed_out(self, timeout: float) -> None:
        self.timer = None
        assert self.client is not None
        self._failed(CallTimeout(f"{self.client.endpoint}: no reply within {timeout:g} s"), cancel=True)

    def _close(self, cancel: bool) -> None:
        """The attempt in flight is over: its timer, its pending request (cancelled on the engine if
        ``cancel``) and its slot in the router's count."""
        inst, self.inst = self.inst, None
        if inst is None:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        assert self.client is not None
        if cancel:
            self.client.cancel(self.req_id)
        else:
            self.client.forget(self.req_id)
        self.flow.router.done(inst)

    def _end(self, error: APIError | None) -> None:
        if not self.ended:
            self.ended = True
            self.on_end(error)

    def _on_reply(self, flag: int, reply: TokenOutput | BusError | None) -> None:
        inst = self.inst
        if inst is None:
            return  # a late reply to an attempt already over
        try:
            if isinstance(reply, BusError):
                self._failed(reply)
                return
            last = flag != FLAG_ITEM
            if flag != FLAG_END:
                assert isinstance(reply, TokenOutput)
                self.output_seen = self.output_seen or bool(reply.token_ids) or reply.finish_reason is not None
                if reply.finish_reason is not None:
                    self.finished = True
                    if reply.finish_reason != "remote_decode":
                        self.holders.pop(inst.id, None)  # finished: the engine freed everything
                if not last:
                    self._arm(self.flow.config.stream_idle_timeout_s)
                self.on_output(inst, reply)
            if last:
                self._close(cancel=False)
                self._end(None)
        except APIError as e:
            self._close(cancel=True)
            self._end(e)
        except Exception as e:  # a bug here must fail the request, not leave it waiting for its deadline
            log.exception("%s leg of %s failed", self.role, self.gen.request_id)
            self._close(cancel=True)
            self._end(APIError(500, f"gateway error: {type(e).__name__}: {e}", code="internal_error"))

    def _failed(self, e: BusError, cancel: bool = False) -> None:
        inst = self.inst
        assert inst is not None
        self._close(cancel)
        if self.finished:  # the stream's end marker was lost after the final output: nothing to undo
            self._end(None)
            return
        if not isinstance(e, PeerError) or e.code not in ("invalid_request", "kv_transfer_failed"):
            self.flow.router.mark_failed(inst)  # not for bad input, nor for a read from a failing prefill
        if self.output_seen or not self.retryable(e):
            self._end(leg_error(self.role, inst, e))
            return
        if len(self.tried) > self.flow.config.max_retries:
            code = e.code if isinstance(e, PeerError) else "upstream_unavailable"
            self._end(APIError(503, f"{self.role} leg failed on {', '.join(self.tried)} (last: {e})", code=code))
            return
        self.holders.pop(inst.id, None)
        self.flow.clients.abort(inst, self.gen.request_id)
        self.start()


# --------------------------------------------------------------------------- #
# One choice
# --------------------------------------------------------------------------- #


class ChoiceRun:
    """Choice ``index`` of a request: one colocated leg, or a prefill leg then a decode leg.

    ``start()`` sends its first leg; from then on bus replies drive it.  Each piece
    goes to ``emit``; ``on_done(self, error)`` is called once when it ends by
    itself (``error`` None or the ``APIError``).  ``cancel()`` ends it without
    ``on_done``.  Unless it finished normally, every holder gets an ``Abort``.
    """

    __slots__ = ("flow", "request_id", "model", "prompt", "sampling", "stats", "index", "emit", "on_done",
                 "holders", "leg", "done", "sent", "first", "prompt_ids", "prefill", "final", "prefill_done")

    def __init__(self, flow: Flow, request_id: str, model: str, prompt: Prompt, sampling: SamplingParams,
                 stats: ChoiceStats, index: int, emit: Emit,
                 on_done: Callable[["ChoiceRun", APIError | None], None]):
        self.flow, self.request_id, self.model, self.prompt, self.sampling = flow, request_id, model, prompt, sampling
        self.stats, self.index, self.emit, self.on_done = stats, index, emit, on_done
        self.holders: dict[str, Instance] = {}
        self.leg: Leg | None = None
        self.done = False
        self.sent = 0.0  # when the current leg's Generate went out
        self.first = True  # no token of the current leg seen yet
        self.prompt_ids = prompt.token_ids
        self.prefill: Instance | None = None
        self.final: TokenOutput | None = None  # prefill's last output
        self.prefill_done = 0.0

    def start(self) -> None:
        if self.done:
            return
        try:
            colocated = self.flow.router.leg_for(self.model) == "colocated"
        except APIError as e:
            self._finish(e)
            return
        config = self.flow.config
        if colocated:
            gen = Generate(request_id=self.request_id, sampling=self.sampling, **self.prompt.generate_fields())
            self._leg("both", gen, config.prefill_timeout_s, _retry_before_output, self._on_colocated, self._finish)
        else:
            gen = Generate(request_id=self.request_id, sampling=self.sampling, do_remote_decode=True,
                           **self.prompt.generate_fields())
            self._leg("prefill", gen, config.prefill_timeout_s, _retry_before_output, self._on_prefill,
                      self._on_prefill_end)

    def cancel(self) -> None:
        if not self.done:
            self._finish(None, notify=False, abort=True)

    # -- internals ---------------------------------------------------------

    def _leg(self, role: Role, gen: Generate, first_timeout: float, retryable: Callable[[BusError], bool],
             on_output: Callable[[Instance, TokenOutput], None], on_end: Callable[[APIError | None], None],
             like: Instance | None = None) -> None:
        self.sent, self.first = time.perf_counter(), True
        self.leg = Leg(self.flow, role, self.model, gen, self.holders, first_timeout, retryable, on_output, on_end,
                       like)
        self.leg.start()

    def _finish(self, error: APIError | None, notify: bool = True, abort: bool = False) -> None:
        if self.done:
            return
        self.done = True
        if self.leg is not None:
            self.leg.stop()
        if error is not None or abort:
            for inst in self.holders.values():
                self.flow.clients.abort(inst, self.request_id)
            self.holders.clear()
        if notify:
            self.on_done(self, error)

    def _put(self, out: TokenOutput, finish_reason: str | None) -> None:
        self.emit(ChoiceEvent(self.index, Piece(out.text, out.token_ids, out.logprobs, finish_reason), self.stats))

    def _on_colocated(self, inst: Instance, out: TokenOutput) -> None:
        if self.first and out.token_ids:
            self.flow.metrics.prefill_leg.observe(time.perf_counter() - self.sent)
            self.first = False
        if out.finish_reason == "abort":
            raise APIError(503, "the engine aborted the request", code="aborted")
        if out.usage is not None:
            self.stats.prompt_tokens = out.usage.prompt_tokens
            self.stats.cached_tokens = out.usage.cached_tokens
            self.stats.completion_tokens = out.usage.completion_tokens
            self.flow.observe_prefill_timings(out)
        if out.token_ids or out.finish_reason:
            self._put(out, out.finish_reason)

    def _on_prefill(self, inst: Instance, out: TokenOutput) -> None:
        if out.prompt_token_ids is not None:
            self.prompt_ids = out.prompt_token_ids
        if out.finish_reason is None:
            return
        self.prefill, self.final = inst, out
        self.prefill_done = time.perf_counter()
        self.flow.metrics.prefill_leg.observe(self.prefill_done - self.sent)
        if out.finish_reason == "abort":
            raise APIError(503, f"prefill instance {inst.id} aborted the request", code="aborted")
        if out.usage is not None:
            self.stats.prompt_tokens = out.usage.prompt_tokens
            self.stats.cached_tokens = out.usage.cached_tokens
        self.stats.completion_tokens = len(out.token_ids)
        self.flow.observe_prefill_timings(out)
        done = out.finish_reason != "remote_decode"
        self._put(out, out.finish_reason if done else None)

    def _on_prefill_end(self, error: APIError | None) -> None:
        final, prefill = self.final, self.prefill
        if error is None and (final is None or prefill is None):
            error = APIError(502, "prefill ended without a final output", code="upstream_error")
        if error is not None:
            self._finish(error)
            return
        assert final is not None and prefill is not None
        if final.finish_reason != "remote_decode":
            self._finish(None)  # the first token ended the request: no decode leg, prefill freed its blocks
            return
        if final.kv_transfer is None or self.prompt_ids is None:
            self._finish(APIError(502, f"prefill instance {prefill.id} sent remote_decode without "
                                  "kv_transfer or prompt_token_ids", code="upstream_error"))
            return
        gen = Generate(request_id=self.request_id, sampling=self.sampling, prompt_token_ids=self.prompt_ids,
                       remote_prefill=final.kv_transfer)
        self.flow.metrics.decode_dispatch.observe(time.perf_counter() - self.prefill_done)
        self._leg("decode", gen, self.flow.config.decode_first_token_timeout_s, _retry_untaken, self._on_decode,
                  self._finish, like=prefill)

    def _on_decode(self, inst: Instance, out: TokenOutput) -> None:
        if self.first:
            self.flow.metrics.decode_first_output.observe(time.perf_counter() - self.sent)
            self.flow.observe_decode_timings(out)
            self.first = False
        if out.finish_reason == "abort":
            raise APIError(503, "the decode engine aborted the request", code="aborted")
        self.stats.completion_tokens += len(out.token_ids)
        if out.finish_reason is not None:
            if out.usage is not None:  # counts every output token, the first included
                self.stats.completion_tokens = out.usage.completion_tokens
            assert self.prefill is not None
            self.holders.pop(self.prefill.id, None)  # decode finished: it read and released prefill's KV
        if out.token_ids or out.finish_reason:
            self._put(out, out.finish_reason)


# --------------------------------------------------------------------------- #
# All choices of a request
# --------------------------------------------------------------------------- #


def choice_request_id(request_id: str, index: int, total: int) -> str:
    return request_id if total == 1 else f"{request_id}-{index}"


class RequestRun:
    """Every choice of ``req`` (prompt-major, ``n`` per prompt), run concurrently; pieces go to ``emit``.

    ``stats`` holds one ``ChoiceStats`` per choice.  ``done`` resolves once every
    choice finished, or with the first choice's error, the others then being
    cancelled.  ``cancel()`` stops every choice (client gone, deadline).
    """

    __slots__ = ("stats", "done", "_remaining", "_runs")

    def __init__(self, flow: Flow, req: ParsedRequest, request_id: str, emit: Emit):
        total = len(req.prompts) * req.n
        self.stats = [ChoiceStats() for _ in range(total)]
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._remaining = total
        self._runs = [ChoiceRun(flow, choice_request_id(request_id, i, total), req.model, req.prompts[i // req.n],
                                req.choice_sampling(i % req.n), self.stats[i], i, emit, self._choice_done)
                      for i in range(total)]

    def start(self) -> "RequestRun":
        for run in self._runs:
            run.start()
        return self

    def cancel(self) -> None:
        for run in self._runs:
            run.cancel()

    def _choice_done(self, _: ChoiceRun, error: APIError | None) -> None:
        if self.done.done():
            return
        if error is not None:
            self.cancel()
            self.done.set_exception(error)
            return
        self._remaining -= 1
        if self._remaining == 0:
            self.done.set_result(None)
