"""The gateway's HTTP API (Starlette) and ``serve()``.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /v1/instances``, ``GET /health``, ``GET /ready``, ``GET /metrics``,
``GET /openapi.json``.  Every error is an OpenAI error body; every response
carries ``X-Request-Id`` (the client's, when it sent a valid one).

A streaming request answers its HTTP status only once the first token (or an
error) is known, so validation errors from the engine are a real 400; after
that, failures arrive as one SSE ``error`` event followed by ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import os
import re
import time
from functools import partial
from typing import AsyncIterator, Callable, Protocol

import msgspec
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from common.messages import Instance, MembershipChange
from common.registry_client import MembershipWatcher
from common.service import tune_gc
from services.gateway import openai_protocol as oai
from services.gateway import sse
from services.gateway.config import GatewayConfig
from services.gateway.engine_clients import EngineClients
from services.gateway.errors import APIError, invalid
from services.gateway.flow import ChoiceEvent, ChoiceStats, Flow, RequestRun
from services.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from services.gateway.router import Router

log = logging.getLogger(__name__)

REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
CLIENT_GONE = 499  # the status logged for requests whose client disconnected

_json = msgspec.json.Encoder().encode


class Membership(Protocol):
    instances: dict[str, Instance]

    def add_listener(self, callback: Callable[[MembershipChange, Instance], None]) -> None: ...


class JSONResponse:
    """``obj`` as a JSON response (with ``X-Request-Id`` when given), an ASGI app like Starlette's
    responses: the raw headers are built directly, without the per-response header bookkeeping
    of Starlette's ``Response``, a measurable share of a short request's cost."""

    __slots__ = ("status_code", "body", "raw_headers")

    def __init__(self, obj: object, status: int = 200, request_id: str | None = None):
        self.status_code = status
        self.body = _json(obj)
        self.raw_headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(self.body))]
        if request_id:
            self.raw_headers.append((b"x-request-id", request_id.encode()))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body})


def error_response(e: APIError, request_id: str | None = None) -> JSONResponse:
    return JSONResponse(e.body(), e.status, request_id)


class _ChoiceText:
    """What one choice has produced so far (for non-streaming responses and logprob offsets)."""

    __slots__ = ("text", "logprobs", "finish_reason")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.logprobs: list = []
        self.finish_reason: str | None = None


def _logprob_entries(event: ChoiceEvent) -> list:
    """(TokenLogprob, token string) pairs of one piece (see ``openai_protocol`` on token strings)."""
    piece = event.piece
    if not piece.logprobs:
        return []
    single = len(piece.token_ids) == 1
    return [(lp, lp.token or (piece.text if single else f"token_id:{lp.token_id}")) for lp in piece.logprobs]


def _header(headers: dict[bytes, bytes], name: bytes) -> str | None:
    """A request header's value from the ASGI scope's (lowercase) headers, or None."""
    value = headers.get(name)
    return None if value is None else value.decode("latin-1")


def _end_of_events(queue: asyncio.Queue, done: asyncio.Future) -> None:
    """A streaming request's choices ended: queue the end of its events (None, or the error)."""
    queue.put_nowait(None if done.cancelled() or done.exception() is None else done.exception())


class Gateway:
    """The HTTP app over a membership view; ``app`` is the ASGI application."""

    def __init__(self, config: GatewayConfig, membership: Membership, *, watcher_ready: Callable[[], bool]):
        self.config = config
        self.membership = membership
        self.watcher_ready = watcher_ready
        self.metrics = GatewayMetrics()
        self.router = Router(membership.instances, mode=config.mode, prefill_policy=config.prefill_policy,
                             decode_policy=config.decode_policy, failure_cooldown_s=config.failure_cooldown_s)
        self.clients = EngineClients(
            control_timeout_s=config.abort_timeout_s,
            stream_timeout_s=config.stream_idle_timeout_s,
            on_abort=lambda inst: self.metrics.aborts.labels(inst.role).inc(),
        )
        self.flow = Flow(config, self.router, self.clients, self.metrics)
        self.active: set[str] = set()  # request ids in flight
        self.metrics.in_flight.set_function(lambda: len(self.active))
        # Generated request ids: a random prefix per gateway process, then a counter.
        self._id_prefix = os.urandom(8).hex()
        self._id_counter = itertools.count(1)
        for inst in membership.instances.values():
            self.metrics.observe_instance(inst)
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
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
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
            response = await handler(scope, receive)
        else:
            response = error_response(APIError(405, f"{scope['method']} {scope['path']}: Method Not Allowed",
                                               code="method_not_allowed"))
        await response(scope, receive, send)

    def on_membership(self, change: MembershipChange, inst: Instance) -> None:
        self.router.changed(change, inst)
        if change in ("left", "expired"):
            self.metrics.forget_instance(inst)
            self.clients.drop(inst)
        else:
            self.metrics.observe_instance(inst)

    async def close(self) -> None:
        await self.clients.close()

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
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def models(self, request: Request) -> ASGIApp:
        if (denied := self._unauthorized(request.headers.get("authorization"))) is not None:
            return denied
        created = int(time.time())
        data = [{"id": m, "object": "model", "created": created, "owned_by": "pdserve"}
                for m in self.router.models()]
        return JSONResponse({"object": "list", "data": data})

    async def instances(self, request: Request) -> ASGIApp:
        if (denied := self._unauthorized(request.headers.get("authorization"))) is not None:
            return denied
        data = [msgspec.to_builtins(i) for i in sorted(self.membership.instances.values(), key=lambda i: i.id)]
        return JSONResponse({"object": "list", "data": data})

    async def openapi(self, request: Request) -> ASGIApp:
        return JSONResponse(openapi_document())

    # -- generation ------------------------------------------------------------

    def _unauthorized(self, authorization: str | None) -> ASGIApp | None:
        """None when no API key is set or ``authorization`` (the header's value) bears it, else the 401."""
        key = self.config.api_key
        if key is None:
            return None
        given = authorization or ""
        if given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), key.encode()):
            return None
        return error_response(APIError(401, "missing or invalid API key (Authorization: Bearer <key>)",
                                       code="invalid_api_key"))

    async def _body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes:
        """The whole request body; raises 413 past ``max_body_bytes``, ``sse.ClientGone`` on a disconnect."""
        limit = self.config.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise self._too_large()
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise sse.ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self) -> APIError:
        return APIError(413, f"request body exceeds {self.config.max_body_bytes} bytes", code="request_too_large")

    def _fresh_request_id(self) -> str:
        """A request id unique to this gateway process: its random prefix, then a counter."""
        return f"{self._id_prefix}{next(self._id_counter):016x}"

    def _request_id(self, given: str | None) -> str:
        """The request's id (``X-Request-Id``'s value ``given``, or a fresh one), reserved in ``active``
        at once, so two requests sending the same id concurrently cannot both run (and abort each
        other's legs)."""
        if given is None:
            given = self._fresh_request_id()
        elif not REQUEST_ID.fullmatch(given):
            raise invalid("X-Request-Id must be 1-128 characters of A-Z a-z 0-9 . _ : -", "X-Request-Id")
        elif given in self.active:
            raise invalid(f"request id {given!r} is already in flight", "X-Request-Id", "duplicate_request_id")
        self.active.add(given)
        return given

    def _check_model(self, req: oai.ParsedRequest) -> None:
        models = self.router.models()
        if not models:
            raise APIError(503, "no instance is registered", code="no_instance")
        if req.model not in models:
            raise invalid(f"model {req.model!r} is not served; available: {', '.join(models)}", "model",
                          "model_not_found")
        self.router.leg_for(req.model)  # 503 fast when a needed role is missing
        context = self.router.max_model_len(req.model)
        if req.max_tokens_given:
            if req.sampling.max_tokens >= context:
                raise invalid(f"max_tokens {req.sampling.max_tokens} leaves no room for the prompt in the "
                              f"context of {context} tokens", "max_tokens")
        elif req.sampling.max_tokens >= context:
            req.sampling.max_tokens = max(1, context // 2)

    async def _generate(self, scope: Scope, receive: Receive, endpoint: str, parse,
                        default_max_tokens: int) -> ASGIApp:
        """``POST endpoint``: the request parsed by ``parse``, run, answered (JSON or SSE)."""
        start = time.perf_counter()
        request_id = None
        try:
            headers = dict(scope["headers"])
            if (denied := self._unauthorized(_header(headers, b"authorization"))) is not None:
                self._count(endpoint, 401)
                return denied
            request_id = self._request_id(_header(headers, b"x-request-id"))
            body = await self._body(headers, receive)
            req = parse(body, default_max_tokens=default_max_tokens, max_n=self.config.max_n)
            self._check_model(req)
        except (APIError, sse.ClientGone) as e:
            if request_id is not None:
                self._finish(request_id)
            if isinstance(e, sse.ClientGone):
                return self._client_gone(endpoint)
            self._count(endpoint, e.status)
            return error_response(e, request_id)
        deadline = asyncio.get_running_loop().time() + self.config.request_timeout_s
        run: RequestRun | None = None
        streaming = False  # once True, the event stream's cleanup owns the run
        try:
            if req.stream:
                queue: asyncio.Queue = asyncio.Queue()
                run = RequestRun(self.flow, req, request_id, queue.put_nowait)
                run.done.add_done_callback(partial(_end_of_events, queue))
                run.start()
                first = await sse.run_until_disconnect(receive, self._next(queue, deadline))
                outcome = {"status": CLIENT_GONE}  # set by the stream when it ends by itself

                async def cleanup() -> None:
                    run.cancel()
                    self._count(endpoint, outcome["status"])
                    self._finish(request_id)

                streaming = True
                return sse.EventStream(self._sse(req, request_id, queue, first, run.stats, deadline, start,
                                                 outcome), cleanup, {"X-Request-Id": request_id})
            choices = [_ChoiceText() for _ in range(len(req.prompts) * req.n)]
            run = RequestRun(self.flow, req, request_id, partial(self._collect, req, choices, start)).start()
            await sse.run_until_disconnect(receive, run.done, deadline)
            body = self._full_response(req, request_id, choices, run.stats)
            self._count(endpoint, 200)
            self.metrics.e2e.observe(time.perf_counter() - start)
            return JSONResponse(body, 200, request_id)
        except APIError as e:
            self._count(endpoint, e.status)
            return error_response(e, request_id)
        except sse.ClientGone:
            return self._client_gone(endpoint)
        except TimeoutError:  # the request deadline of the non-streaming path
            e = self._timed_out()
            self._count(endpoint, e.status)
            return error_response(e, request_id)
        finally:
            if not streaming:
                if run is not None:
                    run.cancel()
                self._finish(request_id)

    def _client_gone(self, endpoint: str) -> ASGIApp:
        """What a request whose client disconnected answers (nobody reads it; counted as 499)."""
        self._count(endpoint, CLIENT_GONE)
        return Response(status_code=CLIENT_GONE)

    def _finish(self, request_id: str) -> None:
        self.active.discard(request_id)

    def _count(self, endpoint: str, status: int) -> None:
        self.metrics.count_request(endpoint, status)

    async def _next(self, queue: asyncio.Queue, deadline: float) -> ChoiceEvent | None:
        """The next event, or None at the end; raises the choices' error, or 504 past the request deadline."""
        try:
            async with asyncio.timeout_at(deadline):
                item = await queue.get()
        except TimeoutError:
            raise self._timed_out() from None
        if isinstance(item, Exception):
            raise item
        return item

    def _timed_out(self) -> APIError:
        return APIError(504, f"request exceeded {self.config.request_timeout_s:g} s", code="request_timeout")

    def _observe_token(self, event: ChoiceEvent, start: float) -> None:
        stats = event.stats
        if not event.piece.token_ids or stats.second_token_seen:
            return
        now = time.perf_counter()
        if stats.first_token_at is None:
            stats.first_token_at = now
            self.metrics.ttft.observe(now - start)
        else:
            stats.second_token_seen = True
            self.metrics.first_itl.observe(now - stats.first_token_at)

    def _observe_choices(self, stats: list[ChoiceStats]) -> None:
        end = time.perf_counter()
        for s in stats:
            if s.first_token_at is not None and s.completion_tokens > 1:
                self.metrics.tpot.observe((end - s.first_token_at) / (s.completion_tokens - 1))

    def _usage(self, req: oai.ParsedRequest, stats: list[ChoiceStats]) -> dict:
        """Prompt and cached tokens once per prompt (its first choice), completion tokens of every choice."""
        firsts = stats[::req.n]
        return oai.usage_dict(sum(s.prompt_tokens for s in firsts), sum(s.completion_tokens for s in stats),
                              sum(s.cached_tokens for s in firsts))

    def _collect(self, req: oai.ParsedRequest, choices: list[_ChoiceText], start: float, event: ChoiceEvent) -> None:
        """``emit`` of a non-streaming request: the event's piece added to its choice."""
        self._observe_token(event, start)
        c = choices[event.index]
        c.text.append(event.piece.text)
        if req.logprobs:
            c.logprobs.extend(_logprob_entries(event))
        if event.piece.finish_reason is not None:
            c.finish_reason = event.piece.finish_reason

    def _full_response(self, req: oai.ParsedRequest, request_id: str, choices: list[_ChoiceText],
                       stats: list[ChoiceStats]) -> dict:
        self._observe_choices(stats)
        out = []
        for i, c in enumerate(choices):
            logprobs = None
            if req.logprobs:
                logprobs = (oai.completion_logprobs(c.logprobs, 0) if req.kind == "completion"
                            else oai.chat_logprobs(c.logprobs))
            out.append(oai.full_choice(req.kind, i, "".join(c.text), c.finish_reason or "stop", logprobs))
        return oai.full_response(req, request_id, out, self._usage(req, stats))

    async def _sse(self, req: oai.ParsedRequest, request_id: str, events: asyncio.Queue,
                   first: ChoiceEvent | None, stats: list[ChoiceStats], deadline: float, start: float,
                   outcome: dict) -> AsyncIterator[bytes]:
        """The SSE body; sets ``outcome["status"]`` when it ends by itself (200, or the error's status)."""
        offsets = [0] * (len(req.prompts) * req.n)
        started: set[int] = set()
        try:
            event = first
            while event is not None:
                self._observe_token(event, start)
                piece = event.piece
                logprobs = None
                if req.logprobs:
                    entries = _logprob_entries(event)
                    if req.kind == "completion":
                        logprobs = oai.completion_logprobs(entries, offsets[event.index])
                    else:
                        logprobs = oai.chat_logprobs(entries)
                offsets[event.index] += len(piece.text)
                choice = oai.chunk_choice(req.kind, event.index, piece.text, piece.finish_reason, logprobs,
                                          event.index not in started)
                started.add(event.index)
                yield sse.event(oai.chunk(req, request_id, [choice]))
                event = await self._next(events, deadline)
            self._observe_choices(stats)
            if req.include_usage:
                yield sse.event(oai.chunk(req, request_id, [], self._usage(req, stats)))
            outcome["status"] = 200
            self.metrics.e2e.observe(time.perf_counter() - start)
            yield sse.DONE
        except APIError as e:
            outcome["status"] = e.status
            log.warning("request %s failed mid-stream: %s", request_id, e.message)
            yield sse.event(e.body())
            yield sse.DONE


def openapi_document() -> dict:
    """The OpenAPI 3.1 description of the API; request schemas come from the request structs."""
    (completion, chat), components = msgspec.json.schema_components(
        [oai.CompletionRequest, oai.ChatCompletionRequest], ref_template="#/components/schemas/{name}")

    def post(summary: str, schema: dict) -> dict:
        return {"post": {"summary": summary,
                         "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
                         "responses": {"200": {"description": "JSON, or text/event-stream when stream is true"},
                                       "400": {"description": "invalid request (OpenAI error body)"},
                                       "401": {"description": "missing or invalid API key"},
                                       "413": {"description": "body too large"},
                                       "502": {"description": "an engine failed"},
                                       "503": {"description": "no instance available"},
                                       "504": {"description": "an engine or the request timed out"}}}}

    def get(summary: str) -> dict:
        return {"get": {"summary": summary, "responses": {"200": {"description": "OK"}}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": "pdserve gateway", "version": "1"},
        "paths": {
            "/v1/completions": post("Text completion (OpenAI)", completion),
            "/v1/chat/completions": post("Chat completion (OpenAI)", chat),
            "/v1/models": get("Served models"),
            "/v1/instances": get("Registered instances with their load"),
            "/health": get("Process alive"),
            "/ready": get("A serving set of instances is registered (503 otherwise)"),
            "/metrics": get("Prometheus metrics"),
        },
        "components": {"schemas": components},
    }


# Per-request work uvicorn does by default that the gateway has no use for: rewriting the
# client address from X-Forwarded-For (nothing reads it) and a "Server: uvicorn" header.
UVICORN_LEAN = {"proxy_headers": False, "server_header": False}


class HTTPServer(uvicorn.Server):
    """uvicorn without its own signal handlers: ``run_service`` owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    @property
    def port(self) -> int:
        """The TCP port it listens on (useful with port 0); valid once ``started``."""
        return self.servers[0].sockets[0].getsockname()[1]


async def serve(config: GatewayConfig, *, ready: asyncio.Event | None = None,
                started: Callable[[HTTPServer], None] | None = None, gateway_class: type[Gateway] = Gateway) -> None:
    """Watch the registry and serve HTTP until cancelled, then shut down in order.

    Once listening it tunes the process's garbage collector (``tune_gc``).
    Shutdown: stop accepting, let in-flight requests finish for ``shutdown_timeout_s``,
    cancel the rest (their engine legs get ``Abort``), close engine clients, stop watching.
    ``started(server)`` is called once listening (tests read ``server.port``);
    ``gateway_class`` lets a benchmark serve a variant of the app under the same process setup.
    """
    config.validate()
    watcher = MembershipWatcher(config.registry, idle_timeout=config.registry_idle_timeout_s,
                                grace_s=config.membership_grace_s)
    snapshot = asyncio.Event()
    watcher.start()
    wait_snapshot = asyncio.create_task(watcher.wait_ready())
    wait_snapshot.add_done_callback(lambda t: t.cancelled() or t.exception() or snapshot.set())
    gateway = gateway_class(config, watcher, watcher_ready=snapshot.is_set)
    server = HTTPServer(uvicorn.Config(
        gateway.app, interface="asgi3", host=config.host, port=config.port, loop="uvloop", http="httptools",
        lifespan="off", log_level=config.log_level, access_log=False, **UVICORN_LEAN,
        timeout_graceful_shutdown=max(1, round(config.shutdown_timeout_s)),
    ))
    task = asyncio.create_task(server.serve(), name="gateway-http")
    try:
        while not server.started:
            if task.done():
                task.result()  # a bind failure raises here
                raise RuntimeError("the HTTP server exited before starting")
            await asyncio.sleep(0.01)
        log.info("gateway on http://%s:%d (registry %s, mode %s)", config.host, server.port,
                 config.registry, config.mode)
        tune_gc(config.gc_threshold)
        if started is not None:
            started(server)
        if ready is not None:
            ready.set()
        await asyncio.shield(task)
    finally:
        server.should_exit = True
        await asyncio.gather(task, return_exceptions=True)
        wait_snapshot.cancel()
        await gateway.close()
        await watcher.close()
        log.info("gateway stopped")
