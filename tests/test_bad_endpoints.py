"""Endpoints that cannot be dialed are refused before a socket exists, and a failed connect closes its
sockets: a real decode engine process answers ``invalid_request`` to ``remote_prefill.kv_endpoint``
values that are not ``tcp://host:port`` or ``ipc://path``, and its open files stay where they were."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from bench.processes import Processes
from common.bus import BusClient
from common.bus.endpoints import BadEndpoint, endpoint_problem
from common.errors import PeerError
from common.messages import Generate, KVTransferParams, SamplingParams
from tests.procs import eventually

BAD = ["garbage", "tcp://127.0.0.1:99999", "tcp://127.0.0.1:abc", "tcp://:7000", "tcp://*:7000", "ipc://",
       "inproc://kv", "udp://127.0.0.1:7000", "tcp://127.0.0.1:0"]
GOOD = ["tcp://127.0.0.1:7000", "tcp://prefill-0.internal:7001", "tcp://[::1]:7000", "ipc:///tmp/pdserve/kv-0"]


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


async def test_a_decode_engine_refuses_bad_kv_endpoints_and_keeps_its_fds():
    ids = list(range(1, 21))
    sampling = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    def generate(i: int) -> Generate:
        params = KVTransferParams(engine_id="prefill-x", kv_endpoint=BAD[i % len(BAD)], transfer_id=f"x/{i}",
                                  block_ids=[0, 1], num_tokens=len(ids), first_token_id=5,
                                  lease_expiry=time.time() + 30, block_size=16)
        return Generate(f"bad-{i}", sampling, prompt_token_ids=ids, remote_prefill=params)

    async def refused(client: BusClient, i: int) -> tuple[str, str | None]:
        try:
            await client.call(generate(i))
        except PeerError as e:
            return e.code, e.param
        return "answered", None

    async with Processes() as procs:
        procs.start_registry()
        decode = procs.start_engine("decode", "decode")
        await procs.wait_registered("decode")
        client = BusClient(decode.endpoint, timeout=30.0)
        try:
            before = open_fds(decode.popen.pid)
            answers = await asyncio.gather(*(refused(client, i) for i in range(200)))
            assert set(answers) == {("invalid_request", "remote_prefill.kv_endpoint")}
            await eventually(lambda: open_fds(decode.popen.pid) <= before + 3, timeout=10)
            procs.check_alive("decode")
        finally:
            await client.close()
