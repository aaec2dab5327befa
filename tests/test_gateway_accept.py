"""The gateway's HTTP server accepts every waiting connection at once (``acceptor.Acceptor``), on uvloop as
it serves: uvloop's own server accepts one connection per loop iteration, so on a busy gateway a burst of
new connections waited seconds in the kernel's queue (issue 16, session 9)."""

from __future__ import annotations

import asyncio
import os
import resource
import socket

import pytest
import uvicorn

from common.service import new_event_loop
from services.gateway import acceptor
from services.gateway.http_protocol import GatewayHTTPProtocol
from services.gateway.responses import JSONResponse
from services.gateway.server import HTTPServer
from tests.procs import eventually

CONNECTIONS = 100


def run(main) -> None:
    """``main()`` on the event loop the gateway runs on (uvloop)."""
    loop = new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def http_server(port: int = 0) -> HTTPServer:
    return HTTPServer(uvicorn.Config(JSONResponse({"ok": True}, 200, "r"), interface="asgi3", host="127.0.0.1",
                                     port=port, http=GatewayHTTPProtocol, lifespan="off", log_level="warning"))


async def iterations_until(done) -> int:
    """Event-loop iterations that pass until ``done()``."""
    count = 0
    while not done():
        await asyncio.sleep(0)
        count += 1
        assert count < 10 * CONNECTIONS, "never done"
    return count


def test_a_burst_of_connections_is_accepted_in_a_few_loop_iterations_and_served():
    async def main() -> None:
        server = http_server()
        task = asyncio.create_task(server.serve())
        await iterations_until(lambda: server.started)
        # the kernel completes each handshake; the connections wait in the listening socket's queue
        clients = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(CONNECTIONS)]
        try:
            accepted = server.server_state.connections
            assert await iterations_until(lambda: len(accepted) == CONNECTIONS) <= 5  # uvloop's server: >= 100
            for c in clients:
                c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            for c in clients:
                c.setblocking(False)
            answered: set[int] = set()

            def read_all() -> bool:
                for i, c in enumerate(clients):
                    try:
                        if i not in answered and c.recv(4096).startswith(b"HTTP/1.1 200 OK"):
                            answered.add(i)
                    except BlockingIOError:
                        pass
                return len(answered) == CONNECTIONS

            await iterations_until(read_all)
        finally:
            for c in clients:
                c.close()
            server.should_exit = True
            await task
        assert server.servers[0].sockets[0].fileno() == -1  # shut down: no longer listening

    run(main)


def test_a_port_in_use_stops_the_start_up_with_uvicorns_status():
    async def main() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            with pytest.raises(SystemExit) as exit:
                await http_server(taken.getsockname()[1]).serve()
        assert exit.value.code == 3

    run(main)


def test_out_of_file_descriptors_it_pauses_then_accepts_the_rest(monkeypatch, caplog):
    monkeypatch.setattr(acceptor, "RETRY_S", 0.05)

    async def main() -> None:
        server = http_server()
        task = asyncio.create_task(server.serve())
        await iterations_until(lambda: server.started)
        clients = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(10)]
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 3, hard))
        try:
            accepted = server.server_state.connections
            await eventually(lambda: "cannot accept connections" in caplog.text)
            assert len(accepted) < 10
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        try:
            await eventually(lambda: len(accepted) == 10)  # the retry, RETRY_S later
        finally:
            for c in clients:
                c.close()
            server.should_exit = True
            await task

    run(main)
