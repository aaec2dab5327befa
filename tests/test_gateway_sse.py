"""``sse.DisconnectWatch`` and ``run_until_disconnect`` against an ASGI-style ``receive``.

The receive here behaves like uvicorn's: it answers body chunks, then waits on an
event until the client goes away and answers ``http.disconnect``.  The end-to-end
disconnect behaviour (aborts reaching the engines) is in ``test_gateway_flow.py``.
"""

from __future__ import annotations

import asyncio

import pytest

from services.gateway import sse


class Client:
    """The receive side of one HTTP request: queued messages, then a disconnect when ``leave()``."""

    def __init__(self, *messages: dict):
        self.messages = list(messages)
        self.gone = asyncio.Event()
        self.waiting = 0  # receive() calls parked on the event right now

    def leave(self) -> None:
        self.gone.set()

    async def receive(self) -> dict:
        if self.messages:
            return self.messages.pop(0)
        self.waiting += 1
        try:
            await self.gone.wait()
        finally:
            self.waiting -= 1
        return {"type": "http.disconnect"}


async def test_watch_reports_a_disconnect_once_after_reading_leftover_messages():
    client = Client({"type": "http.request", "body": b"late", "more_body": False})
    seen: list[int] = []
    watch = sse.DisconnectWatch(client.receive, lambda: seen.append(1))
    assert client.waiting == 1 and seen == []
    client.leave()
    for _ in range(3):
        await asyncio.sleep(0)
    assert seen == [1] and client.waiting == 0
    watch.close()  # after the disconnect: nothing left to stop
    assert seen == [1]


async def test_close_stops_watching_and_unwinds_the_pending_receive():
    client = Client()
    seen: list[int] = []
    watch = sse.DisconnectWatch(client.receive, lambda: seen.append(1))
    assert client.waiting == 1
    watch.close()
    assert client.waiting == 0  # the receive coroutine was closed, its waiter removed
    client.leave()
    await asyncio.sleep(0.01)
    assert seen == []


async def test_run_until_disconnect_cancels_the_work_and_raises_client_gone():
    client = Client()
    cancelled = asyncio.Event()

    async def work() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    asyncio.get_running_loop().call_later(0.02, client.leave)
    with pytest.raises(sse.ClientGone):
        await sse.run_until_disconnect(client.receive, work())
    assert cancelled.is_set()
    assert asyncio.current_task().cancelling() == 0  # the cancellation was consumed, not leaked


async def test_run_until_disconnect_returns_the_result_and_stops_listening():
    client = Client()

    async def answer() -> str:
        await asyncio.sleep(0.001)
        return "done"

    assert await sse.run_until_disconnect(client.receive, answer()) == "done"
    assert client.waiting == 0


async def test_an_outside_cancellation_is_not_mistaken_for_a_disconnect():
    client = Client()
    task = asyncio.create_task(sse.run_until_disconnect(client.receive, asyncio.sleep(30)))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert client.waiting == 0


async def test_one_client_watch_serves_several_waits_with_one_receive():
    client = Client()
    calls = 0
    receive = client.receive

    async def counting_receive() -> dict:
        nonlocal calls
        calls += 1
        return await receive()

    watch = sse.ClientWatch(counting_receive)
    assert await watch.run(asyncio.sleep(0, "first")) == "first"
    assert await watch.run(asyncio.sleep(0, "body")) == "body"
    assert calls == 1 and client.waiting == 1  # one receive, still pending across both waits
    watch.close()
    assert client.waiting == 0


async def test_a_client_gone_between_waits_fails_the_next_wait_at_once():
    client = Client()
    watch = sse.ClientWatch(client.receive)
    client.leave()
    for _ in range(3):  # the disconnect arrives while nothing runs: noted, nothing cancelled
        await asyncio.sleep(0)
    assert asyncio.current_task().cancelling() == 0
    work = asyncio.sleep(30)
    with pytest.raises(sse.ClientGone):
        await watch.run(work)
    assert work.cr_frame is None  # closed, never awaited (no "never awaited" warning)
    watch.close()
