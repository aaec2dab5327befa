"""The read-mode flow of one request: its choices, each a prefill leg then a decode leg; retries, aborts.
(Push mode, decode leg first: ``push_flow.py``.)

Disaggregated choice::

    prefill  Generate(do_remote_decode)  -> TokenOutput(first token, kv_transfer)
             (the first token goes to the client at once)
    decode   Generate(prompt_token_ids, remote_prefill=kv_transfer) -> tokens 2.., final usage

Colocated choice: one ``Generate`` to a ``both`` instance that streams every token.

Ownership: every instance that may still hold the request (running it, or
prefill pinning its KV for decode) is in the choice's ``holders``.  Whenever a
choice ends other than normally (engine failure, timeout, client disconnect,
cancellation) each holder gets an ``Abort`` — for a prefill that already
answered, that releases its pinned blocks.  Retries and timeouts are the
leg's (``leg.Leg``).

Execution: a choice is a small state machine driven by the bus (``Leg`` and
``ChoiceRun`` hear each reply the moment the bus reader takes it in, through
``BusClient.request``), not a coroutine: the next leg is sent from the reply's
callback and each piece is handed to the request run's ``emit`` (the gateway
collects them for a JSON response or queues them for SSE).  The request's own
task sleeps until every choice is done, so a request costs one task wake-up,
not one per reply through a stack of generators — a large share of a short
request's cost.  Measurements go to the context's ``FlowObserver``.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Callable

from common.messages import Generate, Instance, Role, TokenLogprob, TokenOutput
from services.gateway.context import FlowContext
from services.gateway.errors import APIError, no_instance
from services.gateway.leg import Leg
from services.gateway.openai_protocol import ParsedRequest
from services.gateway.request_ids import RequestId


@dataclass(slots=True)
class Piece:
    """Output of one choice as it goes to the client; the last one has ``finish_reason``."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None = None


@dataclass(slots=True)
class ChoiceStats:
    """Usage of one choice: prompt and cached tokens from prefill, completion tokens from the last leg;
    when its first token was emitted, whether its second was, and its finish reason once it finished."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    first_token_at: float | None = None
    second_token_seen: bool = False
    finish_reason: str | None = None


@dataclass(slots=True)
class ChoiceEvent:
    """A piece of choice ``index``."""

    index: int
    piece: Piece


Emit = Callable[[ChoiceEvent], None]


def choice_request_id(request_id: str, index: int, total: int) -> str:
    return request_id if total == 1 else f"{request_id}-{index}"


class ChoiceRun:
    """Choice ``index`` of ``run``: one colocated leg, or a prefill leg then a decode leg.

    ``start()`` sends its first leg; from then on bus replies drive it.  Each piece
    goes to ``run.emit``; ``run.choice_done(error)`` is called once when it ends by
    itself (``error`` None or the ``APIError``).  ``cancel()`` ends it without
    that call.  Unless it finished normally, every holder gets an ``Abort``
    (``_finish``, the one place a choice lets go of its instances).
    """

    __slots__ = ("run", "context", "model", "index", "request_id", "prompt", "sampling", "stats", "holders", "leg", "done", "sent",
                 "first", "prompt_ids", "prefill", "final", "prefill_done", "prefill_on_decode")

    def __init__(self, run: RequestRun, index: int):
        req = run.req
        self.run, self.context, self.model, self.index = run, run.context, req.model, index
        self.request_id = choice_request_id(run.handle, index, len(run.stats))
        self.prompt = req.prompts[index // req.n]
        self.sampling = req.choice_sampling(index % req.n)
        self.stats = run.stats[index]
        self.holders: dict[str, Instance] = {}
        self.leg: Leg | None = None
        self.done = False
        self.sent = 0.0  # when the current leg's Generate went out
        self.first = True  # no token of the current leg seen yet
        self.prompt_ids = self.prompt.token_ids
        self.prefill: Instance | None = None
        self.final: TokenOutput | None = None  # prefill's last output
        self.prefill_done = 0.0
        self.prefill_on_decode = False  # its prompt is computing on a decode instance (``Router.local_prefills``)

    def start(self) -> None:
        if self.done:
            return
        try:
            colocated = self.context.router.mode_for(self.model) == "colocated"
        except APIError as e:
            self._finish(e)
            return
        if colocated:
            gen = Generate(request_id=self.request_id, sampling=self.sampling, **self.prompt.generate_fields())
            self._leg("both", gen, self._on_colocated, self._finish)
            return
        engines = self.context.router.kv_mode_for(self.model)
        if engines != self.kv_mode:
            self._finish(no_instance(f"this gateway moves KV in {self.kv_mode} mode (--kv-mode) and the engines of "
                                     f"model {self.model!r} in {engines} mode: run the gateway with --kv-mode "
                                     f"{engines} or auto"))
            return
        if self.context.router.prefill_on_decode(self.model, self.context.config.local_prefill_queue):
            self._start_on_decode()
            return
        self._start_disaggregated()

    kv_mode = "read"  # the engines' --kv-mode this flow speaks

    def _start_disaggregated(self) -> None:
        """Read mode: the prefill leg first (push mode overrides this)."""
        gen = Generate(request_id=self.request_id, sampling=self.sampling, do_remote_decode=True,
                       **self.prompt.generate_fields())
        self._leg("prefill", gen, self._on_prefill, self._on_prefill_end)

    def _start_on_decode(self) -> None:
        """Conditional disaggregation: the whole request on a decode instance, as a colocated leg."""
        self.prefill_on_decode = True
        self.context.router.local_prefill_started(self.model)
        self.context.observer.on_prefill_on_decode()
        gen = Generate(request_id=self.request_id, sampling=self.sampling, **self.prompt.generate_fields())
        self._leg("decode", gen, self._on_colocated, self._finish)

    def _prompt_computed(self) -> None:
        """A prompt computing on a decode instance is done (its first token, or the choice's end)."""
        if self.prefill_on_decode:
            self.prefill_on_decode = False
            self.context.router.local_prefill_done(self.model)

    def cancel(self) -> None:
        if not self.done:
            self._finish(None, notify=False, abort=True)

    # -- internals ---------------------------------------------------------

    def _leg(self, role: Role, gen: Generate, on_output: Callable[[Instance, TokenOutput], None],
             on_end: Callable[[APIError | None], None], like: Instance | None = None) -> None:
        self.sent, self.first = time.perf_counter(), True
        self.leg = Leg(self, role, gen, on_output, on_end, like)
        self.leg.start()

    def _finish(self, error: APIError | None, notify: bool = True, abort: bool = False) -> None:
        if self.done:
            return
        self.done = True
        self._prompt_computed()
        leg, self.leg = self.leg, None  # the leg refers to this choice: no cycle left for the garbage collector
        if leg is not None:
            leg.stop()
        if error is not None or abort:
            connections = self.context.connections
            for inst in self.holders.values():
                connections.abort(inst, self.request_id)
            self.holders.clear()
        if notify:
            self.run.choice_done(error)

    def _put(self, out: TokenOutput, finish_reason: str | None) -> None:
        stats = self.stats
        if out.token_ids and not stats.second_token_seen:
            now = time.perf_counter()
            if stats.first_token_at is None:
                stats.first_token_at = now
                self.context.observer.on_first_token(now - self.run.started_at)
            else:
                stats.second_token_seen = True
                self.context.observer.on_second_token(now - stats.first_token_at)
        if finish_reason is not None:
            stats.finish_reason = finish_reason
        self.run.emit(ChoiceEvent(self.index, Piece(out.text, out.token_ids, out.logprobs, finish_reason)))

    def _on_colocated(self, inst: Instance, out: TokenOutput) -> None:
        observer = self.context.observer
        if self.first and out.token_ids:
            observer.on_first_leg_token(time.perf_counter() - self.sent)
            self.first = False
            self._prompt_computed()
        if out.finish_reason == "abort":
            raise APIError(503, "the engine aborted the request", code="aborted")
        if out.usage is not None:
            self.stats.prompt_tokens = out.usage.prompt_tokens
            self.stats.cached_tokens = out.usage.cached_tokens
            self.stats.completion_tokens = out.usage.completion_tokens
            observer.on_prefill_timings(out.timings or {})
        if out.token_ids or out.finish_reason:
            self._put(out, out.finish_reason)

    def _on_prefill(self, inst: Instance, out: TokenOutput) -> None:
        if out.prompt_token_ids is not None:
            self.prompt_ids = out.prompt_token_ids
        if out.finish_reason is None:
            return
        observer = self.context.observer
        self.prefill, self.final = inst, out
        self.prefill_done = time.perf_counter()
        observer.on_first_leg_token(self.prefill_done - self.sent)
        if out.finish_reason == "abort":
            raise APIError(503, f"prefill instance {inst.id} aborted the request", code="aborted")
        if out.usage is not None:
            self.stats.prompt_tokens = out.usage.prompt_tokens
            self.stats.cached_tokens = out.usage.cached_tokens
        self.stats.completion_tokens = len(out.token_ids)
        observer.on_prefill_timings(out.timings or {})
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
        self.context.observer.on_decode_dispatch(time.perf_counter() - self.prefill_done)
        self._leg("decode", gen, self._on_decode, self._finish, like=prefill)

    def _on_decode(self, inst: Instance, out: TokenOutput) -> None:
        if self.first:
            self.context.observer.on_decode_first_output(time.perf_counter() - self.sent, out.timings or {})
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


CLIENT_GONE = 499  # the status logged for requests whose client disconnected


class RequestRun:
    """Every choice of ``req`` (prompt-major, ``n`` per prompt), run concurrently; pieces go to ``emit``.

    ``stats`` holds one ``ChoiceStats`` per choice.  ``done`` resolves once every
    choice finished, or with the first choice's error, the others then being
    cancelled; ``fail(error)`` ends it so from outside (shutdown).  ``deadline`` (the loop's clock)
    is when the request times out: ``done`` then fails with the 504.  One alarm (a loop timer) watches
    that deadline and the silence deadlines of the run's legs in flight (``legs``), instead of a timer
    per leg and per wait: set at ``start`` for the shortest silence any leg may have, so that no leg's
    deadline comes before it, it is moved only when it goes off (a request that long) or when a deadline
    before it is asked for (``wake_by``).
    The run is in ``context.runs`` until it closes.
    ``close(status)`` is the run's one cleanup, whoever ends it (the JSON answer,
    the event stream, a failure): it stops every choice still running (aborting
    their legs, freeing their router slots), reports the request to the observer
    and releases the request id and its admission slot (taken before the run was made).
    A second ``close`` does nothing.
    """

    __slots__ = ("context", "req", "request_id", "handle", "endpoint", "started_at", "deadline", "emit", "stats",
                 "done", "closed", "legs", "_remaining", "_runs", "_loop", "_alarm", "_alarm_at")

    def __init__(self, context: FlowContext, req: ParsedRequest, ids: RequestId, endpoint: str,
                 started_at: float, emit: Emit, choice: type[ChoiceRun]):
        """``ids`` are already reserved in ``context.request_ids``: ``request_id`` is their label (what the
        client sees), ``handle`` what engines see; ``started_at`` is the ``time.perf_counter()`` at which
        the HTTP request arrived; each choice runs as a ``choice`` (``choices.choice_class``)."""
        total = len(req.prompts) * req.n
        loop = asyncio.get_running_loop()
        self.context, self.req, self.endpoint = context, req, endpoint
        self.request_id, self.handle = ids
        self.started_at = started_at
        self.deadline = loop.time() + context.config.request_timeout_s
        self.emit = emit
        self.stats = [ChoiceStats() for _ in range(total)]
        self.done: asyncio.Future[None] = loop.create_future()
        self.closed = False
        self.legs: set[Leg] = set()
        self._loop = loop
        self._alarm: asyncio.TimerHandle | None = None
        self._alarm_at = math.inf
        self._remaining = total
        self._runs = [choice(self, i) for i in range(total)]
        context.runs.add(self)

    def start(self) -> None:
        """Set the alarm, send every choice's first leg."""
        self.wake_by(self._loop.time() + self.context.shortest_silence_s)
        for run in self._runs:
            run.start()

    def wake_by(self, when: float) -> None:
        """Have the alarm go off by ``when`` (or the request's deadline, if earlier)."""
        when = min(when, self.deadline)
        if when < self._alarm_at:
            if self._alarm is not None:
                self._alarm.cancel()
            self._alarm_at, self._alarm = when, self._loop.call_at(when, self._on_alarm)

    def _on_alarm(self) -> None:
        self._alarm, self._alarm_at = None, math.inf
        now = self._loop.time()
        if now >= self.deadline:
            self.fail(self.timed_out())
            return
        for leg in [leg for leg in self.legs if leg.due <= now]:
            leg.expired()
        if not self.done.done():
            self.wake_by(min((leg.due for leg in self.legs), default=self.deadline))

    def timed_out(self) -> APIError:
        """The 504 of a request past its deadline."""
        return APIError(504, f"request exceeded {self.context.config.request_timeout_s:g} s", code="request_timeout")

    def close(self, status: int = CLIENT_GONE) -> None:
        """End the run, answered with ``status`` (by default: the client went away)."""
        if self.closed:
            return
        self.closed = True
        self.context.runs.discard(self)
        if self._alarm is not None:
            self._alarm.cancel()
            self._alarm = None
        self._cancel()
        self._runs = []  # each refers to this run: no cycle left for the garbage collector
        self.context.observer.on_request_done(self.endpoint, status, time.perf_counter() - self.started_at,
                                              self.stats)
        self.context.request_ids.release(self.handle)
        self.context.admission.release()

    def choice_done(self, error: APIError | None) -> None:
        """A choice ended by itself (``error`` None or its ``APIError``)."""
        if error is not None:
            self.fail(error)
            return
        if self.done.done():
            return
        self._remaining -= 1
        if self._remaining == 0:
            self.done.set_result(None)

    def fail(self, error: APIError) -> None:
        """End the run with ``error`` unless it already ended: every choice still running is stopped, and
        the answer (or the stream's last event) is ``error``."""
        if self.done.done():
            return
        self._cancel()
        self.done.set_exception(error)

    def _cancel(self) -> None:
        for run in self._runs:
            run.cancel()
