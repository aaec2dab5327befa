"""One leg of a choice: a ``Generate`` on an instance of one role, retried while nothing was output.

A leg that computes the prompt (a prefill leg, a colocated leg, or a decode
instance's plain ``Generate`` under conditional disaggregation) and fails before
its first output is retried on another instance, at most ``max_retries`` times;
a decode leg that reads (or awaits) prefill's KV is retried only when its
instance never took the request (gone, shutting down).  Timeouts
measure silence, never total time: each runs from the leg's last message (a
token, or the empty output an engine sends while the request waits in its
queue) — ``prefill_timeout_s`` until the first message of a leg computing the prompt,
``decode_first_token_timeout_s`` until a KV-receiving decode leg's first,
``stream_idle_timeout_s`` after that.  So a long or queued generation never
times out while its engine is alive; a leg silent that long fails with
``upstream_timeout``.  A leg has no timer of its own: its silence deadline is ``due``, and its
request's one alarm (``LegClock``, ``flow.RequestRun``) calls ``expired()`` once it has passed.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Callable, Protocol

from common.bus import FLAG_END, FLAG_ITEM, BusClient
from common.errors import BusError, CallTimeout, PeerError, PeerGone
from common.messages import Generate, Instance, Role, TokenOutput
from services.gateway.context import FlowContext
from services.gateway.errors import APIError, no_instance

log = logging.getLogger(__name__)

RETRY_CODES = ("overloaded", "shutting_down")


def retry_before_output(e: BusError) -> bool:
    """A prefill or colocated attempt that failed so may go to another instance (before any output)."""
    return isinstance(e, (PeerGone, CallTimeout)) or (isinstance(e, PeerError) and e.code in RETRY_CODES)


def retry_untaken(e: BusError) -> bool:
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


class LegClock(Protocol):
    """The request's alarm, shared by its legs (``flow.RequestRun``)."""

    legs: set[Leg]  # the legs in flight: ``expired()`` is called on each whose ``due`` has passed

    def wake_by(self, when: float) -> None:
        """Check the legs' deadlines no later than ``when`` (the loop's clock)."""


class LegOwner(Protocol):
    """What a leg needs of the choice it runs for (``flow.ChoiceRun``)."""

    context: FlowContext
    model: str
    holders: dict[str, Instance]  # instances that may still hold the choice's request
    run: LegClock


class Leg:
    """``gen`` on an instance of ``role`` for ``choice``, retried on another one while nothing was output.

    ``on_output(inst, out)`` hears each ``TokenOutput`` as it arrives (raising
    ``APIError`` ends the leg with it); ``on_end(error)`` is called once, with
    None when the engine's stream ended, else the ``APIError``.  ``stop()`` ends
    it silently (cancelling the request on the engine).  Every instance the leg
    sends to is in the choice's ``holders`` until it finished with the request;
    each attempt holds one router slot, freed when the attempt is over (``_close``).
    ``like``: only instances that can read this one's KV (decode after prefill).
    While an attempt is in flight the leg is in ``choice.run.legs`` with its silence deadline ``due``.
    """

    __slots__ = ("context", "choice", "clock", "role", "gen", "like", "on_output", "on_end", "tried", "inst",
                 "client", "req_id", "due", "silence", "output_seen", "finished", "ended", "computes_prompt")

    def __init__(self, choice: LegOwner, role: Role, gen: Generate,
                 on_output: Callable[[Instance, TokenOutput], None], on_end: Callable[[APIError | None], None],
                 like: Instance | None = None):
        self.context = choice.context
        self.choice, self.role, self.gen, self.like = choice, role, gen, like
        self.clock = choice.run
        self.on_output, self.on_end = on_output, on_end
        self.tried: list[str] = []
        self.inst: Instance | None = None  # the instance of the attempt in flight, None between attempts
        self.client: BusClient | None = None
        self.req_id = 0
        self.due = math.inf  # the loop's clock at which the attempt in flight has been silent too long
        self.silence = 0.0  # that silence, in seconds
        self.output_seen = self.finished = self.ended = False
        self.computes_prompt = gen.remote_prefill is None and not gen.await_push  # not a decode leg fed by prefill

    def start(self) -> None:
        model = self.choice.model
        inst = self.context.router.pick(self.role, model, exclude=self.tried, like=self.like)
        if inst is None:
            if not self.tried:
                self._end(no_instance(f"no {self.role} instance available for model {model!r}"))
            else:
                self._end(no_instance(f"{self.role} failed on {', '.join(self.tried)}; no other instance left"))
            return
        if self.tried:
            self.context.observer.on_leg_retry(self.role)
        self.tried.append(inst.id)
        self.choice.holders[inst.id] = inst
        self.inst, self.output_seen, self.finished = inst, False, False
        self.client = self.context.connections.get(inst)
        self.req_id = 0  # no request of this attempt yet (ids start at 1)
        try:
            self.req_id = self.client.request(self.gen, self._on_reply)
        except BusError as e:  # the client was closed: the instance just left
            self._failed(e)
            return
        config = self.context.config
        self.clock.legs.add(self)
        self._arm(config.prefill_timeout_s if self.computes_prompt else config.decode_first_token_timeout_s)

    def stop(self) -> None:
        """End silently: the engine is told to stop (the caller aborts the holders)."""
        self.ended = True
        self._close(cancel=True)

    def keep_alive(self) -> None:
        """Another leg of the choice heard from its engine: restart this leg's silence timeout (push mode:
        decode waits, silent, while prefill computes)."""
        if self.inst is not None:
            self._arm(self.context.config.stream_idle_timeout_s)

    # -- internals ---------------------------------------------------------

    def expired(self) -> None:
        """The attempt in flight has been silent past ``due`` (the request's alarm calls this)."""
        assert self.client is not None
        self._failed(CallTimeout(f"{self.client.endpoint}: no reply within {self.silence:g} s of silence"),
                     cancel=True)

    def _arm(self, silence: float) -> None:
        self.silence = silence
        self.due = asyncio.get_running_loop().time() + silence
        self.clock.wake_by(self.due)

    def _close(self, cancel: bool) -> None:
        """The attempt in flight is over: its timer, its pending request (cancelled on the engine if
        ``cancel``) and its slot in the router's count."""
        inst, self.inst = self.inst, None
        if inst is None:
            return
        self.due = math.inf
        self.clock.legs.discard(self)
        assert self.client is not None
        if cancel:
            self.client.cancel(self.req_id)
        else:
            self.client.forget(self.req_id)
        self.context.router.done(inst)

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
                        self.choice.holders.pop(inst.id, None)  # finished: the engine freed everything
                if not last:
                    self._arm(self.context.config.stream_idle_timeout_s)
                self.on_output(inst, reply)
            if last:
                self._close(cancel=False)
                self.context.router.succeeded(inst)
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
            self.context.router.mark_failed(inst, e)  # not for bad input, nor for a read from a failing prefill
        retryable = retry_before_output if self.computes_prompt else retry_untaken
        if self.output_seen or not retryable(e):
            self._end(leg_error(self.role, inst, e))
            return
        if len(self.tried) > self.context.config.max_retries:
            code = e.code if isinstance(e, PeerError) else "upstream_unavailable"
            self._end(APIError(503, f"{self.role} leg failed on {', '.join(self.tried)} (last: {e})", code=code))
            return
        self.choice.holders.pop(inst.id, None)
        self.context.connections.abort(inst, self.gen.request_id)
        self.start()
