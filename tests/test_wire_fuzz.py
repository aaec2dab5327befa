"""Hypothesis-generated wire messages against every kind of handler of real processes (issue 15).

A registry, a prefill engine and a decode engine run as processes; hand-driven DEALER sockets send
them records a ``BusClient`` never would: random bytes, random msgpack values, and maps tagged with
every message type their socket accepts (and others) whose fields hold random values, so that some
decode into a message and reach its handler with values nobody checked.  Every record must be
answered within the timeout with a reply of the protocol, never an ``internal`` error (a handler that
raised), and every process must still serve a well-formed request afterwards.
"""

from __future__ import annotations

import asyncio
import itertools
import typing

import msgspec
import pytest
import pytest_asyncio
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.processes import Processes
from common.bus import BusClient
from common.bus.records import FLAG_END, FLAG_FINAL, HEADER, KIND_CANCEL, KIND_REQUEST
from common.messages import (
    EngineRequest,
    GetStats,
    KVRequest,
    ListInstances,
    RegistryRequest,
    RenewLease,
    Reply,
)

EXAMPLES = 60  # per socket kind: ~1 ms a record, a few seconds in all
REPLY_TIMEOUT_S = 10.0
MESSAGE_TYPES = [t for union in (RegistryRequest, EngineRequest, KVRequest) for t in typing.get_args(union)]

scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=40) \
    | st.binary(max_size=40)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                            max_size=4), max_leaves=12)


SIMPLE = {str: st.text(max_size=40), int: st.integers(-(2**63), 2**63 - 1), float: st.floats(), bool: st.booleans(),
          list[str]: st.lists(st.text(max_size=40), max_size=4), list[int]: st.lists(st.integers(-5, 2**40), max_size=8)}


def field_values(annotation) -> st.SearchStrategy:
    """Values of the field's own type where it is a simple one (so that some messages decode), else anything."""
    return st.one_of(SIMPLE[annotation], values) if annotation in SIMPLE else values


@st.composite
def tagged(draw, kinds: list[type]) -> bytes:
    """A map tagged as one of ``kinds`` (message types), some of its fields set to random values."""
    kind = draw(st.sampled_from(kinds))
    hints = typing.get_type_hints(kind)
    fields = draw(st.lists(st.sampled_from(kind.__struct_fields__), unique=True)) if kind.__struct_fields__ else []
    body = {name: draw(field_values(hints[name])) for name in fields}
    body["type"] = kind.__name__
    return msgspec.msgpack.encode(body)




def bodies(accepted) -> st.SearchStrategy:
    """Record bodies for a socket accepting the union ``accepted``: mostly its own message types."""
    own = tagged(list(typing.get_args(accepted)))
    return st.one_of(own, own, own, tagged(MESSAGE_TYPES), st.binary(max_size=200), values.map(msgspec.msgpack.encode))


class Prober:
    """A raw DEALER to one server: ``probe`` sends one record and returns the code of its answer."""

    def __init__(self, endpoint: str):
        self.sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.decoder = msgspec.msgpack.Decoder(Reply)
        self.req_ids = itertools.count(1)

    async def probe(self, body: bytes) -> str:
        """The ErrorReply code answering ``body`` ("ok" for another reply); a stream is cancelled at its first
        item, and what an earlier stream still sent is skipped."""
        req_id = next(self.req_ids)
        await self.sock.send_multipart([HEADER.pack(req_id, KIND_REQUEST), body])
        while True:
            header, reply = await asyncio.wait_for(self.sock.recv_multipart(), REPLY_TIMEOUT_S)
            got_id, flag = HEADER.unpack(header)
            if got_id == req_id:
                break
        if flag == FLAG_END:
            return "ok"
        if flag != FLAG_FINAL:  # a stream (Watch, Generate): one item is enough
            await self.sock.send_multipart([HEADER.pack(req_id, KIND_CANCEL), b""])
        return getattr(self.decoder.decode(reply), "code", "ok")

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def servers():
    """The processes, and endpoint name -> (endpoint, the messages it accepts, a well-formed request it must
    keep answering)."""
    async with Processes() as procs:
        registry = procs.start_registry()
        prefill = procs.start_engine("p0", "prefill")
        decode = procs.start_engine("d0", "decode")
        await procs.wait_registered("p0", "d0")
        yield procs, {
            "registry": (registry.endpoint, RegistryRequest, ListInstances()),
            "prefill": (prefill.endpoint, EngineRequest, GetStats()),
            "decode": (decode.endpoint, EngineRequest, GetStats()),
            "prefill-kv": (prefill.kv_endpoint, KVRequest, RenewLease(transfer_ids=[])),
        }
        procs.check_alive("p0", "d0")


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("name", ["registry", "prefill", "decode", "prefill-kv"])
async def test_every_record_is_answered_with_a_protocol_reply_and_survived(servers, name):
    procs, endpoints = servers
    endpoint, accepted, well_formed = endpoints[name]
    prober = Prober(endpoint)
    seen: list[tuple[bytes, str]] = []
    loop = asyncio.get_running_loop()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(body=bodies(accepted))
    def check(body):
        code = asyncio.run_coroutine_threadsafe(prober.probe(body), loop).result(REPLY_TIMEOUT_S + 5)
        seen.append((body, code))
        assert code != "internal", f"{name}: {body!r} made a handler raise"

    try:
        await loop.run_in_executor(None, check)  # hypothesis drives its examples from a thread of its own
    finally:
        prober.close()
    assert len(seen) == EXAMPLES
    assert any(code == "bad_frame" for _, code in seen)  # the strategies reach the decoder's refusals
    assert any(code != "bad_frame" for _, code in seen)  # and handlers, with values nobody checked
    client = BusClient(endpoint, timeout=REPLY_TIMEOUT_S)
    try:
        await client.call(well_formed)
    finally:
        await client.close()
    procs.check_alive("p0", "d0")
