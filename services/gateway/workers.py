"""A gateway of ``--workers N`` processes serving one port.

The parent (``supervise``) reserves the port with a socket bound with ``SO_REUSEPORT`` that never
listens: port 0 resolves once, and a port any other socket has (another gateway's workers too)
fails before any worker starts.  Each worker
(``server.serve_worker``, its ``GatewayConfig`` and ``WorkerSlot`` as JSON on stdin)
is a whole gateway (``server.serve``: its own registry watch, engine clients, retries, request ids,
drain) listening on its own ``SO_REUSEPORT`` socket on that port.  The kernel hands each new
connection to one listening socket by a hash of its addresses, so keep-alive connections spread
evenly over the workers; with one listening socket shared by all, the first worker awake would
accept a whole burst of connections.  ``/metrics``: see ``worker_metrics``.

A worker that exits is restarted (no sooner than ``RESTART_MIN_INTERVAL_S`` after its last start);
one that exits with status 2 (a start-up error: a bad flag) stops the gateway with status 2.
Workers run in their own session, so a terminal's Ctrl-C reaches the parent only (a second signal
would make a worker exit without draining), and get SIGTERM if the parent dies.  On SIGINT/SIGTERM
the parent sends every worker SIGTERM once; each drains as a single gateway does, and one still
running ``STOP_MARGIN_S`` after the drain's own limit is killed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from common.errors import StartupError
from common.service import die_with_parent
from services.gateway.app import SHUTDOWN_ANSWER_S
from services.gateway.config import GatewayConfig
from services.gateway.worker_metrics import WorkerSlot

log = logging.getLogger(__name__)

POLL_S = 0.1
RESTART_MIN_INTERVAL_S = 1.0
STOP_MARGIN_S = 5.0
WORKER_COMMAND = "from services.gateway.server import serve_worker; serve_worker()"


def reuseport_socket(host: str, port: int, *, alone: bool = False) -> socket.socket:
    """A TCP socket bound to ``host:port`` with ``SO_REUSEPORT``, not listening yet.  ``alone``:
    refused when any socket has that port, even one that shares it (another gateway's workers,
    which a bind with ``SO_REUSEPORT`` would silently join)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if alone and port:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((host, port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise StartupError(f"--port: cannot listen on {host}:{port} ({e.strerror}): another server has it") from None
    return sock


class WorkerProcess:
    """One worker process of slot ``slot``, started again by ``restart_if_exited``."""

    def __init__(self, slot: WorkerSlot, config: GatewayConfig):
        self.slot = slot
        self.spec = json.dumps({"config": dataclasses.asdict(config), "slot": dataclasses.asdict(slot)}).encode()
        self.started_at = 0.0
        self.proc = self._start()

    def _start(self) -> subprocess.Popen:
        self.started_at = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", WORKER_COMMAND], stdin=subprocess.PIPE,
                                start_new_session=True, preexec_fn=die_with_parent)
        with proc.stdin:
            proc.stdin.write(self.spec)
        log.info("gateway worker %d: pid %d", self.slot.index, proc.pid)
        return proc

    def restart_if_exited(self) -> None:
        code = self.proc.poll()
        if code is None:
            return
        if code == 2:
            raise StartupError(f"gateway worker {self.slot.index} could not start (exit status 2); its lines "
                               f"above say why")
        if time.monotonic() - self.started_at < RESTART_MIN_INTERVAL_S:
            return
        log.warning("gateway worker %d (pid %d) exited (%s): restarting it", self.slot.index, self.proc.pid, code)
        self.proc = self._start()


def stop(workers: list[WorkerProcess], timeout_s: float) -> None:
    """SIGTERM every worker once, wait for all of them until ``timeout_s``, then kill what is left."""
    for w in workers:
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for w in workers:
        try:
            w.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("gateway worker %d (pid %d) did not stop in time: killing it", w.slot.index, w.proc.pid)
            w.proc.kill()
            w.proc.wait()


async def supervise(config: GatewayConfig) -> None:
    """Serve ``config.port`` with ``config.workers`` worker processes until cancelled, then stop them."""
    reserved = reuseport_socket(config.host, config.port, alone=True)
    port = reserved.getsockname()[1]
    directory = tempfile.mkdtemp(prefix="pdserve-gateway-")
    worker_config = dataclasses.replace(config, port=port)
    workers: list[WorkerProcess] = []
    try:
        for i in range(config.workers):
            workers.append(WorkerProcess(WorkerSlot(i, config.workers, directory), worker_config))
        log.info("gateway on http://%s:%d: %d worker processes", config.host, port, config.workers)
        while True:
            await asyncio.sleep(POLL_S)
            for w in workers:
                w.restart_if_exited()
    finally:
        timeout_s = config.shutdown_timeout_s + SHUTDOWN_ANSWER_S + STOP_MARGIN_S
        await asyncio.get_running_loop().run_in_executor(None, stop, workers, timeout_s)
        reserved.close()
        shutil.rmtree(directory, ignore_errors=True)
        log.info("gateway stopped")


