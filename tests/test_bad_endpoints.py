"""Endpoints that cannot be dialed are refused before a socket exists, and a failed connect closes its
sockets: a real decode engine process answers ``invalid_request`` to ``remote_prefill.kv_endpoint``
values that are not ``tcp://host:port`` or ``ipc://path``, and its open files stay where they were, also
after reads from endpoints where nobody answers."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import pytest_asyncio

from bench.processes import Processes, free_port
from common.bus import BusClient
from common.bus.endpoints import BadEndpoint, endpoint_problem
from common.errors import PeerError
from common.messages import Generate, KVTransferParams, SamplingParams
from tests.procs import eventually

BAD = ["garbage", "tcp://127.0.0.1:99999", "tcp://127.0.0.1:abc", "tcp://:7000", "tcp://*:7000", "ipc://",
       "inproc://kv", "udp://127.0.0.1:7000", "tcp://127.0.0.1:0"]
GOOD = ["tcp://127.0.0.1:7000", "tcp://prefill-0.internal:7001", "tcp://[::1]:7000", "ipc:///tmp/pdserve/kv-0"]
PROMPT = list(range(1, 21))
SAMPLING = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def open_fds(pid: int | str) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_endpoint_syntax():
    assert [endpoint_problem(e) for e in GOOD] == [None] * len(GOOD)
    assert all(endpoint_problem(e) for e in BAD)


async def test_a_client_of_a_bad_endpoint_leaves_no_socket_behind():
    before = open_fds("self")
    for endpoint in BAD * 10:
        with pytest.raises(BadEndpoint):
            BusClient(endpoint)
    assert open_fds("self") == before


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def decode():
    """A decode engine process that gives up on a silent prefill after 1 s, and a client of it."""
    async with Processes() as procs:
        procs.start_registry()
        proc = procs.start_engine("decode", "decode", "--kv-handshake-timeout-s", "1", "--kv-rpc-timeout-s", "1")
        await procs.wait_registered("decode")
        client = BusClient(proc.endpoint, timeout=60.0)
        try:
            yield proc.popen.pid, client
        finally:
            await client.close()
        procs.check_alive("decode")


def remote_prefill(i: int, kv_endpoint: str) -> Generate:
    params = KVTransferParams(engine_id=f"prefill-{i}", kv_endpoint=kv_endpoint, transfer_id=f"x/{i}",
                              block_ids=[0, 1], num_tokens=len(PROMPT), first_token_id=5,
                              lease_expiry=time.time() + 30, block_size=16)
    return Generate(f"r-{i}", SAMPLING, prompt_token_ids=PROMPT, remote_prefill=params)


async def outcome(client: BusClient, msg: Generate) -> tuple[str, str | None]:
    """How the engine answered: an error's (code, param), or ("answered", None)."""
    try:
        await client.call(msg)
    except PeerError as e:
        return e.code, e.param
    return "answered", None


@pytest.mark.asyncio(loop_scope="module")
async def test_a_decode_engine_refuses_bad_kv_endpoints_and_keeps_its_fds(decode):
    pid, client = decode
    before = open_fds(pid)
    answers = await asyncio.gather(*(outcome(client, remote_prefill(i, BAD[i % len(BAD)])) for i in range(200)))
    assert set(answers) == {("invalid_request", "remote_prefill.kv_endpoint")}
    await eventually(lambda: open_fds(pid) <= before + 3, timeout=10)


@pytest.mark.asyncio(loop_scope="module")
async def test_kv_endpoints_nobody_answers_leave_no_sockets_behind(decode):
    """Each request fails over to its ``--kv-load-failure-policy``; the sockets that dialed are closed."""
    pid, client = decode
    before = open_fds(pid)
    await asyncio.gather(*(outcome(client, remote_prefill(i, f"tcp://127.0.0.1:{free_port()}")) for i in range(50)))
    await eventually(lambda: open_fds(pid) <= before + 3, timeout=15)
