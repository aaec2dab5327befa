"""The gateway process: the registry watch, the HTTP server (uvicorn) and ``serve()`` (with
``--workers`` > 1, the parent of the worker processes: ``workers``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import socket
import sys
from functools import partial
from typing import Callable

import uvicorn
from uvicorn.server import STARTUP_FAILURE
from uvicorn.server import logger as uvicorn_log

from common.bus.curve import configure
from common.discovery import watcher_for
from common.service import run_service, setup_logging, tune_gc
from services.gateway.acceptor import Acceptor, listening_sockets
from services.gateway.app import SHUTDOWN_ANSWER_S, Gateway
from services.gateway.config import GatewayConfig
from services.gateway.http_protocol import GatewayHTTPProtocol
from services.gateway.worker_metrics import WorkerMetrics, WorkerSlot
from services.gateway.workers import reuseport_socket, supervise

log = logging.getLogger(__name__)


# Per-request work uvicorn does by default that the gateway has no use for: rewriting the
# client address from X-Forwarded-For (nothing reads it) and a "Server: uvicorn" header.
UVICORN_LEAN = {"proxy_headers": False, "server_header": False}


class HTTPServer(uvicorn.Server):
    """uvicorn without its own signal handlers (``run_service`` owns SIGINT/SIGTERM), listening through
    ``Acceptor``s (every waiting connection accepted at each wake-up, where uvloop's server accepts one)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's start-up (lifespan, then listening on ``sockets``, bound, or on the configured host and
        port: a failure to bind is logged and exits with uvicorn's status) with ``Acceptor``s in place of
        ``loop.create_server``."""
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(STARTUP_FAILURE)
        config = self.config
        if sockets is None:
            try:
                sockets = listening_sockets(config.host, config.port)
            except OSError as exc:
                uvicorn_log.error(exc)
                await self.lifespan.shutdown()
                sys.exit(STARTUP_FAILURE)
        factory = partial(config.http_protocol_class, config=config, server_state=self.server_state,
                          app_state=self.lifespan.state)
        self.servers = [Acceptor(sock, factory, config.backlog) for sock in sockets]  # type: ignore[misc]
        self.started = True

    @property
    def port(self) -> int:
        """The TCP port it listens on (useful with port 0); valid once ``started``."""
        return self.servers[0].sockets[0].getsockname()[1]


async def serve(config: GatewayConfig, *, ready: asyncio.Event | None = None,
                started: Callable[[HTTPServer], None] | None = None, gateway_class: type[Gateway] = Gateway,
                worker: WorkerSlot | None = None) -> None:
    """Watch the registry and serve HTTP until cancelled, then shut down in order.

    With ``config.workers`` > 1 (and no ``worker``) it runs the worker processes instead
    (``workers.supervise``); a ``worker`` listens on its own ``SO_REUSEPORT`` socket and answers
    ``/metrics`` for every worker (``worker_metrics``).

    Once listening it tunes the process's garbage collector (``tune_gc``).
    Shutdown: stop accepting, let in-flight requests finish for ``shutdown_timeout_s``, end
    the rest with a 503 ``shutting_down`` (a stream's last event, then ``[DONE]``; their engine
    legs get ``Abort``), close engine clients, stop watching (``Gateway.drain``).
    ``started(server)`` is called once listening (tests read ``server.port``);
    ``gateway_class`` lets a benchmark serve a variant of the app under the same process setup.
    """
    config.validate()
    if config.workers > 1 and worker is None:
        await supervise(config)
        return
    watcher = watcher_for(config.registry, idle_timeout=config.registry_idle_timeout_s,
                          grace_s=config.membership_grace_s)
    snapshot = asyncio.Event()
    watcher.start()
    wait_snapshot = asyncio.create_task(watcher.wait_ready())
    wait_snapshot.add_done_callback(lambda t: t.cancelled() or t.exception() or snapshot.set())
    gateway = gateway_class(config, watcher, watcher_ready=snapshot.is_set)
    peers = None if worker is None else WorkerMetrics(gateway.metrics, worker, config.abort_timeout_s)
    server = HTTPServer(uvicorn.Config(
        gateway.app, interface="asgi3", host=config.host, port=config.port, loop="uvloop",
        http=partial(GatewayHTTPProtocol, direct=gateway.direct_routes(), max_body=config.max_body_bytes),
        lifespan="off", log_level=config.log_level, access_log=False, **UVICORN_LEAN,
        # uvicorn cancels what still runs after this: the drain has ended every request by then
        timeout_graceful_shutdown=math.ceil(config.shutdown_timeout_s + SHUTDOWN_ANSWER_S) + 1,
    ))
    task: asyncio.Task | None = None
    try:
        sockets = None
        if peers is not None:
            await peers.start()
            gateway.render_metrics = peers.render
            # a worker (re)started while others serve listens once it knows the instances
            await asyncio.wait({wait_snapshot}, timeout=config.registry_idle_timeout_s)
            sockets = [reuseport_socket(config.host, config.port)]
        task = asyncio.create_task(server.serve(sockets), name="gateway-http")
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
        await gateway.drain(config.shutdown_timeout_s)
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
        wait_snapshot.cancel()
        await gateway.close()
        await watcher.close()
        if peers is not None:
            await peers.close()
        log.info("gateway stopped")


def serve_worker() -> None:
    """A worker process's entry (``workers``): its ``GatewayConfig`` and ``WorkerSlot`` as JSON on stdin."""
    spec = json.loads(sys.stdin.buffer.read())
    config = GatewayConfig(**spec["config"])
    setup_logging(config.log_level)
    configure(config)  # the bus keys, as the command line applies them
    sys.exit(run_service(serve(config, worker=WorkerSlot(**spec["slot"]))))
