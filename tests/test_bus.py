"""The bus over real ZMQ sockets on loopback."""

import asyncio
import time

import msgspec
import pytest
import zmq
import zmq.asyncio

from common.bus import (
    FLAG_END,
    FLAG_FINAL,
    FLAG_ITEM,
    HEADER,
    KIND_REQUEST,
    MAX_BATCH_RECORDS,
    BusClient,
    BusServer,
    encode,
)
from common.engine.kv_cache import KVCache
from common.errors import CallTimeout, PeerError, PeerGone
from tests.procs import eventually
from common.messages import (
    Abort,
    Ack,
    EngineRequest,
    EngineStats,
    ErrorReply,
    Generate,
    GetStats,
    Load,
    Register,
    Reply,
    SamplingParams,
    TokenOutput,
)


def stats() -> EngineStats:
    return EngineStats(instance_id="e1", role="both", load=Load(running=1))


def generate(request_id: str = "r1") -> Generate:
    return Generate(request_id=request_id, sampling=SamplingParams(max_tokens=3), prompt="hi")


@pytest.fixture
async def server():
    srv = BusServer("tcp://127.0.0.1:0", EngineRequest, name="test", max_frame_bytes=4096)
    srv.cancelled = asyncio.Event()
    srv.started = asyncio.Event()

    async def on_stats(msg):
        return stats()

    async def hang_until_cancelled():
        srv.started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            srv.cancelled.set()
            raise

    async def on_generate(msg):
        for i in range(3):
            yield TokenOutput(request_id=msg.request_id, token_ids=[i], text=str(i))
        if msg.prompt == "hang":
            await hang_until_cancelled()

    async def on_abort(msg):
        if msg.request_id == "slow":
            await hang_until_cancelled()
        if msg.request_id == "refuse":
            raise PeerError("invalid_request", "no such request", param="request_id")
        if msg.request_id == "crash":
            raise RuntimeError("boom")
        return Ack()

    srv.on(GetStats, on_stats)
    srv.on(Generate, on_generate)
    srv.on(Abort, on_abort)
    await srv.start()
    yield srv
    await srv.close()


@pytest.fixture
async def client(server):
    c = BusClient(server.endpoint, timeout=5.0)
    yield c
    await c.close()


async def test_call_returns_typed_reply(client):
    reply = await client.call(GetStats())
    assert reply == stats()


async def test_stream_yields_every_item_then_ends(client):
    items = [r async for r in client.stream(generate())]
    assert [r.token_ids for r in items] == [[0], [1], [2]]
    assert all(r.request_id == "r1" for r in items)


class Replies:
    """What ``BusClient.request`` hands its callback, with a future set at the last reply."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, object]] = []
        self.last = asyncio.get_running_loop().create_future()

    def __call__(self, flag: int, reply: object) -> None:
        self.seen.append((flag, reply))
        if flag != FLAG_ITEM and not self.last.done():
            self.last.set_result(None)


async def test_request_hands_each_reply_to_the_callback_the_last_one_not_an_item(client):
    replies = Replies()
    req_id = client.request(generate(), replies)
    await asyncio.wait_for(replies.last, 5)
    client.forget(req_id)
    items = [r for _, r in replies.seen if r is not None]
    assert [r.token_ids for r in items] == [[0], [1], [2]]
    # the last item ends the stream by itself (FLAG_FINAL), or an end record follows it (FLAG_END)
    assert [f for f, _ in replies.seen] in ([FLAG_ITEM, FLAG_ITEM, FLAG_FINAL],
                                           [FLAG_ITEM, FLAG_ITEM, FLAG_ITEM, FLAG_END])


async def test_request_errors_arrive_once_as_final_bus_errors(server, client):
    refused = Replies()
    client.request(Abort(request_id="refuse"), refused)
    await asyncio.wait_for(refused.last, 5)
    [(flag, error)] = refused.seen
    assert flag == FLAG_FINAL and isinstance(error, PeerError) and error.code == "invalid_request"

    stuck = Replies()
    client.request(Abort(request_id="slow"), stuck)
    await asyncio.wait_for(server.started.wait(), 5)
    await client.close()  # the connection goes away: the pending request fails with PeerGone
    [(flag, error)] = stuck.seen
    assert flag == FLAG_FINAL and isinstance(error, PeerGone)


async def test_request_cancel_stops_the_handler_and_silences_the_callback(server, client):
    replies = Replies()
    hang = Generate(request_id="h1", sampling=SamplingParams(max_tokens=3), prompt="hang")
    req_id = client.request(hang, replies)
    await asyncio.wait_for(server.started.wait(), 5)
    await eventually(lambda: len(replies.seen) == 3, timeout=5)
    client.cancel(req_id)
    await asyncio.wait_for(server.cancelled.wait(), 5)
    await asyncio.sleep(0.05)
    assert [f for f, _ in replies.seen] == [FLAG_ITEM] * 3 and not replies.last.done()


async def test_concurrent_calls_are_multiplexed(client):
    replies = await asyncio.gather(*(client.call(GetStats()) for _ in range(50)))
    assert replies == [stats()] * 50


async def test_handler_errors_are_typed(client):
    with pytest.raises(PeerError) as e:
        await client.call(Abort(request_id="refuse"))
    assert (e.value.code, e.value.param) == ("invalid_request", "request_id")
    with pytest.raises(PeerError) as e:
        await client.call(Abort(request_id="crash"))
    assert e.value.code == "internal" and "boom" in e.value.message
    assert await client.call(GetStats()) == stats()  # still serving


async def test_timeout_is_typed_and_server_keeps_serving(server, client):
    t0 = time.monotonic()
    with pytest.raises(CallTimeout):
        await client.call(Abort(request_id="slow"), timeout=0.2)
    assert time.monotonic() - t0 < 2
    assert await client.call(GetStats()) == stats()


async def test_cancelling_a_call_cancels_the_handler(server, client):
    task = asyncio.create_task(client.call(Abort(request_id="slow")))
    await asyncio.wait_for(server.started.wait(), 5)
    task.cancel()
    await asyncio.wait_for(server.cancelled.wait(), 5)
    await eventually(lambda: server.num_active == 0)


async def test_leaving_a_stream_early_cancels_the_handler(server, client):
    async for item in client.stream(Generate(request_id="r", sampling=SamplingParams(), prompt="hang")):
        if item.token_ids == [2]:
            break
    await asyncio.wait_for(server.cancelled.wait(), 5)


async def test_call_on_a_stream_takes_the_first_item_and_cancels_the_rest(server, client):
    first = await client.call(Generate(request_id="x", sampling=SamplingParams(), prompt="hang"))
    assert first.token_ids == [0]
    await asyncio.wait_for(server.started.wait(), 5)
    await asyncio.wait_for(server.cancelled.wait(), 5)


async def test_message_without_handler_is_answered_unsupported():
    srv = BusServer("tcp://127.0.0.1:0", EngineRequest, name="bare")
    await srv.start()
    client = BusClient(srv.endpoint, timeout=5)
    try:
        with pytest.raises(PeerError) as e:
            await client.call(GetStats())
        assert e.value.code == "unsupported" and "GetStats" in e.value.message
    finally:
        await client.close()
        await srv.close()


class RawDealer:
    """A hand-driven DEALER for sending frames the BusClient never would."""

    def __init__(self, endpoint: str):
        self.sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.decoder = msgspec.msgpack.Decoder(Reply)

    async def send(self, *frames: bytes) -> tuple[int, int, object]:
        await self.sock.send_multipart(list(frames))
        header, body = await asyncio.wait_for(self.sock.recv_multipart(), 5)
        req_id, flag = HEADER.unpack(header)
        return req_id, flag, None if flag == FLAG_END else self.decoder.decode(body)

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.mark.parametrize(
    "frames, code, req_id",
    [
        ([b"just one frame"], "bad_frame", 0),
        ([b"short", b"body"], "bad_frame", 0),
        ([HEADER.pack(7, KIND_REQUEST), b"\xc1not msgpack"], "bad_frame", 7),
        ([HEADER.pack(8, KIND_REQUEST), msgspec.msgpack.encode({"type": "Nope"})], "bad_frame", 8),
        ([HEADER.pack(9, KIND_REQUEST), msgspec.msgpack.encode({"type": "Abort"})], "bad_frame", 9),
        ([HEADER.pack(10, KIND_REQUEST), b"\x00" * 5000], "too_large", 10),
        ([f for i in range(MAX_BATCH_RECORDS + 1) for f in (HEADER.pack(100 + i, KIND_REQUEST), encode(GetStats()))],
         "bad_frame", 0),
    ],
    ids=["one-frame", "bad-header", "not-msgpack", "unknown-tag", "missing-field", "oversized", "too-many-records"],
)
async def test_malformed_frames_are_answered_and_survived(server, client, frames, code, req_id):
    raw = RawDealer(server.endpoint)
    try:
        got_id, flag, reply = await raw.send(*frames)
    finally:
        raw.close()
    assert (got_id, flag) == (req_id, FLAG_FINAL)
    assert isinstance(reply, ErrorReply) and reply.code == code
    assert await client.call(GetStats()) == stats()


async def test_message_of_another_union_is_refused(server, client):
    raw = RawDealer(server.endpoint)
    try:
        from common.messages import Capacity, Fingerprint, Instance

        fp = Fingerprint("m", "float32", 16, 2, 2, 8, KVCache.LAYOUT, "mooncake")
        inst = Instance("i", "prefill", "tcp://x:1", "tcp://x:2", "m", fp, Capacity(1, 1, 1))
        _, _, reply = await raw.send(HEADER.pack(3, KIND_REQUEST), encode(Register(instance=inst)))
    finally:
        raw.close()
    assert isinstance(reply, ErrorReply) and reply.code == "bad_frame"


async def test_peer_restart_fails_pending_calls_and_recovers():
    srv = BusServer("tcp://127.0.0.1:0", EngineRequest, name="a")
    started = asyncio.Event()

    async def slow(msg):
        started.set()
        await asyncio.sleep(3600)

    srv.on(Abort, slow)
    await srv.start()
    endpoint = srv.endpoint
    client = BusClient(endpoint, timeout=30)
    try:
        pending = asyncio.create_task(client.call(Abort(request_id="x")))
        await asyncio.wait_for(started.wait(), 5)
        t0 = time.monotonic()
        await srv.close()
        with pytest.raises(PeerGone):
            await pending
        assert time.monotonic() - t0 < 10  # well before the 30 s call timeout

        srv2 = BusServer(endpoint, EngineRequest, name="b")

        async def on_stats(msg):
            return stats()

        srv2.on(GetStats, on_stats)
        await srv2.start()
        try:
            reply = None
            for _ in range(50):  # the DEALER reconnects within its reconnect interval
                try:
                    reply = await client.call(GetStats(), timeout=0.5)
                    break
                except (CallTimeout, PeerGone):
                    continue
            assert reply == stats()
        finally:
            await srv2.close()
    finally:
        await client.close()


async def test_call_to_absent_peer_times_out():
    client = BusClient("tcp://127.0.0.1:1", timeout=0.3)
    try:
        with pytest.raises((CallTimeout, PeerGone)):
            await client.call(GetStats())
    finally:
        await client.close()


async def test_several_records_in_one_message_are_answered_each(server):
    """Clients may batch records; the server answers every one of them by request id."""
    raw = RawDealer(server.endpoint)
    try:
        frames = []
        for req_id in (21, 22, 23):
            frames += [HEADER.pack(req_id, KIND_REQUEST), encode(GetStats())]
        await raw.sock.send_multipart(frames)
        answered: dict[int, object] = {}
        decoder = msgspec.msgpack.Decoder(Reply)
        while len(answered) < 3:
            parts = await asyncio.wait_for(raw.sock.recv_multipart(), 5)
            for header, body in zip(parts[::2], parts[1::2]):
                req_id, flag = HEADER.unpack(header)
                assert flag == FLAG_FINAL
                answered[req_id] = decoder.decode(body)
    finally:
        raw.close()
    assert answered == {21: stats(), 22: stats(), 23: stats()}


async def test_records_of_one_iteration_share_messages_of_at_most_max_batch_records():
    """Calls made in one loop iteration leave batched, but never more than MAX_BATCH_RECORDS
    per message, so a peer can start on the first ones while the rest are produced."""
    router = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    client = BusClient(f"tcp://127.0.0.1:{port}", timeout=5)
    calls = 2 * MAX_BATCH_RECORDS + 3
    try:
        tasks = [asyncio.create_task(client.call(GetStats())) for _ in range(calls)]  # all start in one iteration
        sizes: list[int] = []
        while sum(sizes) < calls:
            identity, *records = await asyncio.wait_for(router.recv_multipart(), 5)
            sizes.append(len(records) // 2)
            answers = []
            for header in records[::2]:
                req_id, _ = HEADER.unpack(header)
                answers += [HEADER.pack(req_id, FLAG_FINAL), encode(stats())]
            await router.send_multipart([identity, *answers])
        assert await asyncio.gather(*tasks) == [stats()] * calls
    finally:
        await client.close()
        router.close()
    assert sizes == [MAX_BATCH_RECORDS, MAX_BATCH_RECORDS, 3]


async def test_stream_first_timeout_is_separate_from_idle_timeout(server, client):
    t0 = time.monotonic()
    with pytest.raises(CallTimeout):
        async for _ in client.stream(Abort(request_id="slow"), idle_timeout=30, first_timeout=0.2):
            pass
    assert time.monotonic() - t0 < 3


async def test_cancel_then_close_still_cancels_the_handler(server):
    """The cancel record is queued by the cancelled call; close() must still send it."""
    client = BusClient(server.endpoint, timeout=30)
    task = asyncio.create_task(client.call(Abort(request_id="slow")))
    await asyncio.wait_for(server.started.wait(), 5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await client.close()
    await asyncio.wait_for(server.cancelled.wait(), 10)
    await eventually(lambda: server.num_active == 0)


async def _raw_stream_flags(endpoint: str, msg) -> list[int]:
    raw = RawDealer(endpoint)
    try:
        await raw.sock.send_multipart([HEADER.pack(31, KIND_REQUEST), encode(msg)])
        flags: list[int] = []
        while not flags or flags[-1] == FLAG_ITEM:
            parts = await asyncio.wait_for(raw.sock.recv_multipart(), 5)
            flags += [HEADER.unpack(h)[1] for h in parts[::2]]
        return flags
    finally:
        raw.close()


async def test_a_stream_ending_with_its_last_item_sends_it_as_final(server):
    """The last item of a stream that returns at once travels as the final record: no end record."""
    flags = await _raw_stream_flags(server.endpoint, generate())
    assert flags == [FLAG_ITEM, FLAG_ITEM, FLAG_FINAL]


async def test_a_stream_that_waits_after_its_last_item_ends_with_an_end_record():
    srv = BusServer("tcp://127.0.0.1:0", EngineRequest, name="late-end")

    async def slow_end(msg):
        yield TokenOutput(request_id=msg.request_id, token_ids=[1], text="a")
        await asyncio.sleep(0.05)

    srv.on(Generate, slow_end)
    await srv.start()
    try:
        assert await _raw_stream_flags(srv.endpoint, generate()) == [FLAG_ITEM, FLAG_END]
    finally:
        await srv.close()


async def test_a_request_id_in_use_is_refused(server):
    raw = RawDealer(server.endpoint)
    try:
        frame = [HEADER.pack(41, KIND_REQUEST), encode(Abort(request_id="slow"))]
        await raw.sock.send_multipart(frame)
        await asyncio.wait_for(server.started.wait(), 5)
        req_id, flag, reply = await raw.send(*frame)  # the same id while the first still runs
        assert (req_id, flag) == (41, FLAG_FINAL)
        assert isinstance(reply, ErrorReply) and reply.code == "bad_frame" and "in use" in reply.message
        assert server.num_active == 1  # the first handler is still tracked (and cancellable)
    finally:
        raw.close()
