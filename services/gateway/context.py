"""What every request run shares: ``FlowContext``, and the ``FlowObserver`` the flow reports to.

The flow records no metric itself: each moment worth measuring is one call on
the observer (``GatewayMetrics`` implements it; a test may pass its own).
"""

from __future__ import annotations

from typing import Protocol, Sequence

from common.messages import Role
from services.gateway.admission import Admission
from services.gateway.config import GatewayConfig
from services.gateway.engine_connections import EngineConnections
from services.gateway.request_ids import RequestIds
from services.gateway.errors import APIError
from services.gateway.router import Router


class ChoiceTiming(Protocol):
    """What the observer reads of a finished choice (``flow.ChoiceStats``); ``finish_reason`` None: it
    never finished (an error, a disconnect, shutdown)."""

    prompt_tokens: int
    completion_tokens: int
    first_token_at: float | None
    finish_reason: str | None


class FlowObserver(Protocol):
    """The measurements of a request's life, in the order they happen (times in seconds)."""

    def on_leg_retry(self, role: Role) -> None:
        """A leg of ``role`` is sent again, to another instance."""

    def on_abort(self, role: Role) -> None:
        """An ``Abort`` goes to an instance of ``role``."""

    def on_prefill_on_decode(self) -> None:
        """A disaggregated request's prompt goes to a decode instance (conditional disaggregation)."""

    def on_first_leg_token(self, elapsed: float) -> None:
        """The prefill (or colocated) leg's first token arrived, ``elapsed`` after its ``Generate`` went out."""

    def on_prefill_timings(self, timings: dict[str, float]) -> None:
        """The prefill (or colocated) engine's own timings of a choice (``queue_s``, ``prefill_s``)."""

    def on_decode_dispatch(self, elapsed: float) -> None:
        """The decode ``Generate`` went out, ``elapsed`` after prefill's first token came in."""

    def on_decode_first_output(self, elapsed: float, timings: dict[str, float]) -> None:
        """Decode's first output, ``elapsed`` after its ``Generate``; with decode's own timings."""

    def on_first_token(self, since_request: float) -> None:
        """A choice's first token, ``since_request`` after the HTTP request arrived (TTFT)."""

    def on_second_token(self, gap: float) -> None:
        """A choice's second token, ``gap`` after its first (for P/D: the handoff)."""

    def on_request_done(self, endpoint: str, status: int, elapsed: float, choices: Sequence[ChoiceTiming]) -> None:
        """A request to ``endpoint`` was answered with ``status``, ``elapsed`` after it arrived."""


class OpenRun(Protocol):
    """A request run not yet closed (``flow.RequestRun``), as shutdown sees it."""

    def fail(self, error: APIError) -> None:
        """End the run with ``error``: its answer, or its stream's last event."""


class FlowContext:
    """The gateway's parts a request run uses: config, router, engine connections, observer, request ids,
    admission (a run holds one of its slots until it closes);
    ``runs`` holds every request run not yet closed (``flow.RequestRun``); ``shortest_silence_s`` is
    the shortest silence timeout a leg may have (``leg``)."""

    __slots__ = ("config", "router", "connections", "observer", "request_ids", "admission", "runs",
                 "shortest_silence_s")

    def __init__(self, config: GatewayConfig, router: Router, connections: EngineConnections,
                 observer: FlowObserver, request_ids: RequestIds, admission: Admission):
        self.config = config
        self.router = router
        self.connections = connections
        self.observer = observer
        self.request_ids = request_ids
        self.admission = admission
        self.runs: set[OpenRun] = set()
        self.shortest_silence_s = min(config.prefill_timeout_s, config.decode_first_token_timeout_s,
                                      config.stream_idle_timeout_s)
