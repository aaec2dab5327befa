"""The gateway's HTTP API: ``Gateway`` and its routes.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /v1/instances``, ``POST /tokenize``, ``POST /detokenize`` (``tokenize``), ``GET /health``, ``GET /ready``, ``GET /metrics``,
``GET /version``, ``GET /openapi.json``.  Every error is an OpenAI error body; every
response carries ``X-Request-Id`` (the client's label, when it sent a valid one; engines see only a
random handle: ``request_ids``).  With
an API key every route needs it but ``/health`` and ``/ready`` (and ``/metrics`` with
``metrics_public``).

A generation request is admitted (API key, request id, body, parse, model, a slot
of ``admission``: it may wait in the bounded queue, or be shed with 429/503),
then becomes a ``RequestRun`` answered as JSON (``responses``) or as an event
stream (``streaming``); the run's ``close`` is its one cleanup.  Its request handle is
reserved (``RequestIds.reserve``) and released however the admission fails (a
cancellation too); the run owns it from then on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from importlib.metadata import version
from typing import Awaitable, Callable, Protocol

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from common.messages import Instance, MembershipChange
from services.gateway import openai_protocol as oai
from services.gateway import sse
from services.gateway.admission import Admission
from services.gateway.auth import unauthorized
from services.gateway.choices import choice_class
from services.gateway.config import GatewayConfig
from services.gateway.context import FlowContext
from services.gateway.direct import DirectHandler, DirectRequest
from services.gateway.engine_connections import EngineConnections
from services.gateway.errors import APIError, invalid
from services.gateway.connection_hook import ConnectionHook, connection_hook
from services.gateway.limits import read_body
from services.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from services.gateway.openapi import openapi_document
from services.gateway.request_ids import RequestIds
from services.gateway.flow import CLIENT_GONE, RequestRun
from services.gateway.responses import JSONResponse, ResponseCollector, error_response
from services.gateway.router import Router
from services.gateway.streaming import EventQueue, SSEWriter
from services.gateway.tokenize import Tokenization

log = logging.getLogger(__name__)

SHUTDOWN_ANSWER_S = 1.0  # after ending what was left at shutdown, how long its answers get to go out
DRAIN_POLL_S = 0.02


class Membership(Protocol):
    """The membership view the gateway serves from (the registry watcher's): instances by id, and changes."""

    instances: dict[str, Instance]

    def add_listener(self, callback: Callable[[MembershipChange, Instance], None]) -> None: ...


def _header(headers: dict[bytes, bytes], name: bytes) -> str | None:
    """A request header's value from the ASGI scope's (lowercase) headers, or None."""
    value = headers.get(name)
    return None if value is None else value.decode("latin-1")


class Gateway:
    """The HTTP app over a membership view; ``app`` is the ASGI application."""

    def __init__(self, config: GatewayConfig, membership: Membership, *, watcher_ready: Callable[[], bool]):
        self.config = config
        self.membership = membership
        self.watcher_ready = watcher_ready
        self.metrics = GatewayMetrics()
        self.router = Router(membership.instances, mode=config.mode, prefill_policy=config.prefill_policy,
                             decode_policy=config.decode_policy, failure_cooldown_s=config.failure_cooldown_s)
        self.connections = EngineConnections(control_timeout_s=config.abort_timeout_s,
                                             on_abort=self.metrics.on_abort)
        self.request_ids = RequestIds()
        self.admission = Admission(config.max_inflight_requests or 1, config.max_queued_requests,
                                   config.queue_timeout_s, config.retry_after_s)
        self.draining = False
        self.context = FlowContext(config, self.router, self.connections, self.metrics, self.request_ids,
                                   self.admission)
        self.tokenization = Tokenization(self.router, self.connections, config.abort_timeout_s)
        self.metrics.in_flight.set_function(self.request_ids.__len__)
        self.metrics.queued.set_function(self.admission.waiters.__len__)
        self.render_metrics: Callable[[], Awaitable[bytes]] = self._render_metrics  # a worker's: every worker's
        for inst in membership.instances.values():
            self.on_membership("joined", inst)
        membership.add_listener(self.on_membership)
        self._generation_routes = {
            "/v1/completions": partial(self._generate, endpoint="/v1/completions", parse=oai.parse_completion,
                                       default_max_tokens=16),
            "/v1/chat/completions": partial(self._generate, endpoint="/v1/chat/completions", parse=oai.parse_chat,
                                            default_max_tokens=config.default_max_tokens),
        }
        self._starlette = Starlette(routes=[
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/instances", self.instances, methods=["GET"]),
            Route("/tokenize", partial(self._tokenization, call=self.tokenization.tokenize), methods=["POST"]),
            Route("/detokenize", partial(self._tokenization, call=self.tokenization.detokenize), methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
            Route("/version", self.version, methods=["GET"]),
            Route("/openapi.json", self.openapi, methods=["GET"]),
        ], exception_handlers={HTTPException: self.http_error})

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI application.  The generation routes are served here directly, skipping
        Starlette's middleware and routing layers (a measurable share of a request's cost);
        every other path goes through Starlette.  Either way an unexpected exception becomes a 500."""
        handler = self._generation_routes.get(scope["path"]) if scope["type"] == "http" else None
        if handler is None:
            await self._starlette(scope, receive, send)
            return
        if scope["method"] == "POST":
            headers = dict(scope["headers"])
            response = await handler(headers, partial(read_body, headers, receive, self.config.max_body_bytes),
                                     receive, connection_hook(scope))
        else:
            response = error_response(APIError(405, f"{scope['method']} {scope['path']}: Method Not Allowed",
                                               code="method_not_allowed"))
        await response(scope, receive, send)

    def direct_routes(self) -> dict[bytes, DirectHandler]:
        """The generation routes for ``GatewayHTTPProtocol`` to serve without the ASGI request cycle
        (``direct``): the same handlers, the body read by the protocol."""
        return {path.encode(): partial(self._direct, route=route) for path, route in self._generation_routes.items()}

    @staticmethod
    def _direct(request: DirectRequest, route: Callable[..., Awaitable[ASGIApp]]) -> Awaitable[ASGIApp]:
        return route(dict(request.headers), request.read_body, None, request.connection)

    def on_membership(self, change: MembershipChange, inst: Instance) -> None:
        self.router.changed(change, inst)
        if not self.config.max_inflight_requests:  # the engines' capacity: what they can decode at once
            self.admission.resize(max(1, sum(i.capacity.max_num_seqs for i in self.membership.instances.values()
                                             if i.role in ("decode", "both"))))
        if change in ("left", "expired"):
            self.metrics.forget_instance(inst)
            self.connections.drop(inst)
        else:
            self.metrics.observe_instance(inst)
            self.connections.track(inst)

    async def drain(self, timeout_s: float) -> None:
        """Shutdown: refuse new generation requests (503), let those in flight finish within
        ``timeout_s``, then end the rest with a 503 ``shutting_down`` (a stream's last event before
        ``[DONE]``) and give their answers ``SHUTDOWN_ANSWER_S`` to go out."""
        self.draining = True
        self.admission.refuse_waiting(APIError(503, "the gateway is shutting down", code="shutting_down"))
        await _wait_until(lambda: not self.request_ids, timeout_s)
        if self.context.runs:
            log.warning("shutdown: ending %d request(s) still in flight after %g s", len(self.context.runs),
                        timeout_s)
        for run in list(self.context.runs):
            run.fail(APIError(503, "the gateway is shutting down", code="shutting_down"))
        await _wait_until(lambda: not self.request_ids, SHUTDOWN_ANSWER_S)

    async def close(self) -> None:
        await self.connections.close()

    # -- small routes ----------------------------------------------------------

    async def http_error(self, request: Request, exc: Exception) -> ASGIApp:
        """Unknown paths and wrong methods, with the OpenAI error body."""
        assert isinstance(exc, HTTPException)
        return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code="not_found" if exc.status_code == 404 else "method_not_allowed"))

    async def health(self, request: Request) -> ASGIApp:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> ASGIApp:
        if self.watcher_ready() and self.router.ready():
            return JSONResponse({"status": "ready"})
        return error_response(APIError(503, "not ready: no registry snapshot yet or no serving instances "
                                       f"for mode {self.config.mode}", code="not_ready"))

    async def prometheus(self, request: Request) -> ASGIApp:
        if not self.config.metrics_public and (
                denied := unauthorized(self.config.api_key, request.headers.get("authorization"))) is not None:
            return denied
        return Response(await self.render_metrics(), media_type=CONTENT_TYPE)

    async def _render_metrics(self) -> bytes:
        return self.metrics.render()

    async def version(self, request: Request) -> ASGIApp:
        """pdserve's version, as vLLM's ``/version`` answers."""
        if (denied := unauthorized(self.config.api_key, request.headers.get("authorization"))) is not None:
            return denied
        return JSONResponse({"version": version("pdserve")})

    async def models(self, request: Request) -> ASGIApp:
        if (denied := unauthorized(self.config.api_key, request.headers.get("authorization"))) is not None:
            return denied
        created = int(time.time())
        data = [{"id": m, "object": "model", "created": created, "owned_by": "pdserve", "root": m,
                 "max_model_len": self.router.max_model_len(m)} for m in self.router.models()]
        return JSONResponse({"object": "list", "data": data})

    async def instances(self, request: Request) -> ASGIApp:
        if (denied := unauthorized(self.config.api_key, request.headers.get("authorization"))) is not None:
            return denied
        data = [msgspec.to_builtins(i) for i in sorted(self.membership.instances.values(), key=lambda i: i.id)]
        return JSONResponse({"object": "list", "data": data})

    async def _tokenization(self, request: Request, call: Callable[[bytes], Awaitable[dict]]) -> ASGIApp:
        """``/tokenize`` and ``/detokenize``: the body read and handed to ``call``, its answer as JSON."""
        if (denied := unauthorized(self.config.api_key, request.headers.get("authorization"))) is not None:
            return denied
        try:
            body = await read_body(dict(request.scope["headers"]), request.receive, self.config.max_body_bytes)
            return JSONResponse(await call(body))
        except (APIError, sse.ClientGone) as e:
            return _answer_failure(e, None)

    async def openapi(self, request: Request) -> ASGIApp:
        if (denied := unauthorized(self.config.api_key, request.headers.get("authorization"))) is not None:
            return denied
        return JSONResponse(openapi_document())

    # -- generation ------------------------------------------------------------

    def _check_model(self, req: oai.ParsedRequest) -> None:
        self.router.served(req.model)
        self.router.mode_for(req.model)  # 503 fast when a needed role is missing
        context = self.router.max_model_len(req.model)
        if req.max_tokens_given:
            if req.sampling.max_tokens >= context:
                raise invalid(f"max_tokens {req.sampling.max_tokens} leaves no room for the prompt in the "
                              f"context of {context} tokens", "max_tokens")
        elif req.sampling.max_tokens >= context:
            req.sampling.max_tokens = max(1, context // 2)

    async def _generate(self, headers: dict[bytes, bytes], read: Callable[[], Awaitable[bytes]],
                        receive: Receive | None, connection: ConnectionHook | None, endpoint: str, parse,
                        default_max_tokens: int) -> ASGIApp:
        """``POST endpoint``: the request admitted (its body from ``read()``), parsed by ``parse``, run,
        answered (JSON or SSE); its client is watched through ``connection``, else ``receive``."""
        started_at = time.perf_counter()
        request_id = None
        try:
            if (denied := unauthorized(self.config.api_key, _header(headers, b"authorization"))) is not None:
                self.metrics.on_request_done(endpoint, denied.status_code, time.perf_counter() - started_at, ())
                return denied
            ids = self.request_ids.reserve(_header(headers, b"x-request-id"))
            request_id = ids.label
            try:  # released if admission fails, however (cancellation too); else the run owns it
                body = await read()
                req = parse(body, default_max_tokens=default_max_tokens, max_n=self.config.max_n)
                self._check_model(req)
                if self.draining:
                    raise APIError(503, "the gateway is shutting down", code="shutting_down")
                if req.echo:
                    for p in req.prompts:
                        if p.token_ids is not None:
                            p.echo_text = await self.tokenization.text(req.model, p.token_ids)
                if not self.admission.try_acquire():  # queued: 429 or 503 when that fails, 499 on a disconnect
                    await sse.run_until_disconnect(receive, self.admission.acquire(), connection=connection)
                choice = choice_class(self.context, req.model)
                if req.stream:
                    events = EventQueue()
                    run = RequestRun(self.context, req, ids, endpoint, started_at, events.put, choice)
                else:
                    collector = ResponseCollector(req)
                    run = RequestRun(self.context, req, ids, endpoint, started_at, collector.add, choice)
                # from here the run owns the request id and the admission slot: its close releases them
            except BaseException:
                self.request_ids.release(ids.handle)
                raise
        except (APIError, sse.ClientGone) as e:
            status = e.status if isinstance(e, APIError) else CLIENT_GONE
            self.metrics.on_request_done(endpoint, status, time.perf_counter() - started_at, ())
            return _answer_failure(e, request_id)
        if req.stream:
            return await self._stream(run, events, receive, connection)
        return await self._respond(run, collector, receive, connection)

    async def _respond(self, run: RequestRun, collector: ResponseCollector, receive: Receive | None,
                       connection: ConnectionHook | None) -> ASGIApp:
        """The JSON answer once every choice finished (or the failure's)."""
        try:
            run.start()
            await sse.run_until_disconnect(receive, run.done, connection)
            body = collector.body(run.request_id, run.stats)
        except BaseException as e:
            return _close_failed(run, e)
        run.close(200)
        return JSONResponse(body, 200, run.request_id)

    async def _stream(self, run: RequestRun, events: EventQueue, receive: Receive | None,
                      connection: ConnectionHook | None) -> ASGIApp:
        """The event stream, once the first event is known (or the failure's answer); from then on
        the stream closes the run, however it ends."""
        events.follow(run)
        watch = sse.ClientWatch(receive, connection)  # the stream's, for both its waits
        try:
            run.start()
            first = await watch.run(events.next())
        except BaseException as e:
            watch.close()
            return _close_failed(run, e)
        return sse.EventStream(SSEWriter(run, events, first).body(), run.close, run.request_id, watch)


async def _wait_until(done: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(DRAIN_POLL_S)


def _answer_failure(e: APIError | sse.ClientGone, request_id: str | None) -> ASGIApp:
    """The answer to a request that failed with ``e`` (a client that went away reads nothing: 499)."""
    if isinstance(e, APIError):
        return error_response(e, request_id)
    return JSONResponse(None, CLIENT_GONE)  # written nowhere: the connection is closed


def _close_failed(run: RequestRun, e: BaseException) -> ASGIApp:
    """``run`` ended by ``e`` before its answer: the run closed with the status its client gets, and
    that answer; an unexpected exception (counted as a 500) or a cancellation propagates."""
    if isinstance(e, APIError):
        run.close(e.status)
        return _answer_failure(e, run.request_id)
    if isinstance(e, sse.ClientGone):
        run.close(CLIENT_GONE)
        return _answer_failure(e, run.request_id)
    run.close(500 if isinstance(e, Exception) else CLIENT_GONE)
    raise e
