"""``KVReader.claim``: the first ``RenewLease`` is queued before ``claim`` returns and leaves with the event
loop's next turn (a decode about to allocate and read without yielding yields once to send it), then resolves
to the blocks the lease holds, or fails after the client's timeout.  Push mode's ``PushDone``
(``KVWriter.done``) leaves so too; a ``ReleaseKV`` one turn later (the caller's next step goes first).  The
prefill (or decode) is a raw ZMQ ROUTER here, so the test sees exactly when the request reaches the wire."""

import asyncio

import msgspec
import pytest
import zmq

from common.bus.records import FLAG_FINAL, HEADER, KIND_REQUEST, encode
from common.engine.kv_cache import KVCache
from common.errors import CallTimeout
from common.kv_transfer.config import KVTransferConfig
from common.kv_transfer.reader import KVReader
from common.kv_transfer.writer import KVWriter
from common.messages import (Ack, Fingerprint, KVRequest, KVTransferParams, LeaseRenewed, PushDone, PushTarget,
                             ReleaseKV, RenewLease)

FINGERPRINT = Fingerprint(model="m", dtype="float16", block_size=16, num_layers=2, num_kv_heads=2, head_dim=8,
                          kv_layout=KVCache.LAYOUT, transfer_backend="mooncake")


@pytest.fixture
def prefill():
    """A ROUTER standing in for a prefill's KV side channel: (socket, endpoint)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield sock, f"tcp://127.0.0.1:{port}"
    sock.close(linger=0)


def params(endpoint: str, transfer_id: str) -> KVTransferParams:
    return KVTransferParams(engine_id="p0", kv_endpoint=endpoint, transfer_id=transfer_id, block_ids=[4, 5],
                            num_tokens=20, first_token_id=7, lease_expiry=1e12)


def reader(rpc_timeout_s: float = 30.0) -> KVReader:
    return KVReader([], "d0", FINGERPRINT, KVTransferConfig(kv_rpc_timeout_s=rpc_timeout_s), {})


def received(sock: zmq.Socket) -> tuple[bytes, int, object]:
    """The next request on ``sock``, waiting at most 5 s without running the event loop."""
    assert sock.poll(5000), "no request reached the prefill"
    identity, header, body = sock.recv_multipart()
    req_id, kind = HEADER.unpack(header)
    assert kind == KIND_REQUEST
    return identity, req_id, msgspec.msgpack.decode(body, type=KVRequest)


async def test_the_claim_leaves_with_the_next_loop_turn_and_resolves_to_the_lease_blocks(prefill):
    sock, endpoint = prefill
    r = reader()
    try:
        claim = r.claim(params(endpoint, "t1"))
        await asyncio.sleep(0)  # one turn: the request is on the wire, whatever else the loop has queued
        identity, req_id, msg = received(sock)  # blocks the loop: only what already left can arrive
        assert msg == RenewLease(["t1"])
        assert r.claim(params(endpoint, "t1")) is claim  # one claim per transfer
        sock.send_multipart([identity, HEADER.pack(req_id, FLAG_FINAL),
                             encode(LeaseRenewed({"t1": 1e12}, {"t1": [4, 5]}))])
        assert await asyncio.wait_for(claim, 10) == [4, 5]
    finally:
        await r.close()


async def test_an_unanswered_claim_fails_after_the_client_timeout(prefill):
    sock, endpoint = prefill
    r = reader(rpc_timeout_s=0.2)
    try:
        claim = r.claim(params(endpoint, "t2"))
        await asyncio.sleep(0)
        assert received(sock)[2] == RenewLease(["t2"])
        with pytest.raises(CallTimeout, match="RenewLease of t2"):
            await asyncio.wait_for(claim, 10)
        gone = r.claim(params(endpoint, "t3"))
        await asyncio.sleep(0)
        identity, req_id, _ = received(sock)
        sock.send_multipart([identity, HEADER.pack(req_id, FLAG_FINAL), encode(LeaseRenewed({}))])
        assert await asyncio.wait_for(gone, 10) is None  # an unknown (or another reader's) transfer
    finally:
        await r.close()


async def test_a_release_leaves_with_the_next_loop_turn_and_an_unanswered_one_drops_the_client(prefill, caplog):
    """``release`` queues ``ReleaseKV`` without a task (the caller's next step goes first); with no answer within
    the client's timeout it is logged, the pooled client is dropped, and ``flush`` returns."""
    sock, endpoint = prefill
    r = reader(rpc_timeout_s=0.2)
    try:
        r.release(params(endpoint, "t4"))
        assert sock.poll(0) == 0  # nothing sent before the loop turns
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert received(sock)[2] == ReleaseKV(["t4"])
        await asyncio.wait_for(r.releases.flush(), 10)
        assert "ReleaseKV t4 to p0 failed (its lease will expire)" in caplog.text
        assert endpoint not in r.clients
    finally:
        await r.close()


async def test_push_done_is_queued_before_done_returns_and_resolves_to_decodes_answer(prefill):
    """Push mode's ``KVWriter.done``: ``PushDone`` leaves with the loop's next turn, as the first token's reply
    queued in the same turn does, then resolves to decode's answer, or fails after the client's timeout."""
    sock, endpoint = prefill
    writer = KVWriter([], "p0", FINGERPRINT, KVTransferConfig(kv_rpc_timeout_s=0.2), {})
    target = PushTarget(engine_id="d0", kv_endpoint=endpoint, transfer_id="t5", block_ids=[4, 5], num_tokens=20,
                        num_cached_tokens=0, block_size=16, lease_expiry=1e12)
    try:
        answer = writer.done(target, 7)
        await asyncio.sleep(0)
        identity, req_id, msg = received(sock)
        assert msg == PushDone("t5", 7)
        sock.send_multipart([identity, HEADER.pack(req_id, FLAG_FINAL), encode(Ack())])
        assert await asyncio.wait_for(answer, 10) == Ack()
        unanswered = writer.done(target, 8)
        with pytest.raises(CallTimeout, match="PushDone of t5"):
            await asyncio.wait_for(unanswered, 10)
    finally:
        await writer.close()
