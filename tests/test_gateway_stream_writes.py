"""How a stream leaves the gateway (issue 16): the last piece and ``[DONE]`` in one write; the stream's first
write after the decode leg's bus message.

Read off the wire: each HTTP chunk of the chunked body is one write of the gateway's, so the
chunks show how the events were batched.  A real gateway, registry and fake engines
(``FakeCluster``); a raw HTTP/1.1 client, since HTTP clients hide chunk boundaries.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import zmq

from bench.fakes import FakeCluster
from common.bus.outbox import Outbox
from common.bus.reader import Reader
from services.gateway.flow import ChoiceEvent, Piece
from services.gateway.streaming import EventQueue

pytestmark = pytest.mark.asyncio


async def chunks_of(url: str, body: dict) -> list[bytes]:
    """The data of each chunk of the chunked answer to ``POST /v1/completions``."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = json.dumps(body).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head.lower(), head
    chunks = []
    while size := int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 10))[:-2], 16):
        chunks.append((await reader.readexactly(size + 2))[:-2])
    writer.close()
    return chunks


@pytest.mark.parametrize("max_tokens", [1, 2, 5])
async def test_the_last_piece_and_done_leave_in_one_write(max_tokens):
    async with FakeCluster() as c:
        chunks = await chunks_of(c.url, {"model": "fake", "prompt": "writes", "max_tokens": max_tokens,
                                         "stream": True, "stream_options": {"include_usage": True}})
    events = [e for chunk in chunks for e in chunk.split(b"\n\n") if e]
    assert len(events) == max_tokens + 2  # the pieces, the usage chunk, [DONE]
    last = [e for e in chunks[-1].split(b"\n\n") if e]
    assert last[-1] == b"data: [DONE]"
    assert json.loads(last[-2][6:])["usage"]["completion_tokens"] == max_tokens
    assert json.loads(last[-3][6:])["choices"][0]["finish_reason"] == "length"


async def test_the_stream_wakes_after_what_the_emitting_callback_queued_for_the_bus():
    """Prefill's first token is emitted, then its decode leg queued on the bus's ``Outbox`` (which flushes on
    the loop's next turn), in one callback: when the waiting stream wakes to write the token, the decode leg's
    message must already have left (here: be readable at the other end of a real zmq pair)."""
    loop = asyncio.get_running_loop()
    context = zmq.Context.instance()
    sender, receiver = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    receiver.bind("inproc://stream-wake")
    sender.connect("inproc://stream-wake")
    reader = Reader(sender, lambda frames: None)
    outbox = Outbox(sender, reader, lambda *failed: None)
    events = EventQueue()
    try:

        async def stream() -> tuple[ChoiceEvent, bool]:
            event = await events.next()
            return event, receiver.poll(0) != 0  # the decode leg already sent when the stream wakes

        task = asyncio.create_task(stream())
        await asyncio.sleep(0)  # the stream waits for its first event

        def on_prefill_reply() -> None:
            events.put(ChoiceEvent(0, Piece("first", [7], None)))
            outbox.add(None, b"header", b"decode leg")

        loop.call_soon(on_prefill_reply)
        event, decode_leg_sent = await asyncio.wait_for(task, 5)
        assert event.piece.token_ids == [7] and decode_leg_sent
        assert receiver.recv_multipart() == [b"header", b"decode leg"]
    finally:
        reader.close()
        sender.close(linger=0)
        receiver.close(linger=0)
