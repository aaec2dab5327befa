"""A streaming request's answer: its events queued as they come, written out as OpenAI SSE chunks.

The HTTP status is sent only once the first event (or an error) is known, so
an engine's validation error is a real 400; after that, a failure arrives as
one SSE ``error`` event followed by ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import AsyncIterator

from common.tasks import wake
from services.gateway import openai_protocol as oai
from services.gateway import sse
from services.gateway.errors import APIError
from services.gateway.flow import ChoiceEvent
from services.gateway.flow import RequestRun
from services.gateway.responses import logprob_entries, usage

log = logging.getLogger(__name__)


WAIT = object()  # EventQueue.ready: nothing queued yet


class EventQueue:
    """The emit target of a streaming request: its events, then the end (None, or the run's error).

    One reader (the stream's task) and a future only while it waits: ``asyncio.Queue`` and
    ``asyncio.timeout`` cost more per event than the rest of the stream's Python work.  No timer
    either: past its deadline the run fails, and that error is the queue's end.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[ChoiceEvent | Exception | None] = deque()
        self._waiter: asyncio.Future | None = None

    def put(self, item: ChoiceEvent | Exception | None) -> None:
        """Queue ``item``; a waiting reader wakes one ready-queue turn later, after whatever the emitting
        callback queued for the bus: prefill's first token is emitted just before the decode leg is sent,
        and the leg's message leaves before the stream writes the token to its client."""
        self._items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            asyncio.get_running_loop().call_soon(wake, waiter)  # (a reader cancelled meanwhile: a client gone)

    def follow(self, run: RequestRun) -> None:
        """Queue the end of ``run``'s events once every choice ended."""
        run.done.add_done_callback(self._end)

    def _end(self, done: asyncio.Future) -> None:
        self.put(None if done.cancelled() or done.exception() is None else done.exception())

    async def next(self) -> ChoiceEvent | None:
        """The next event, or None at the end; raises the run's error (504 past its deadline)."""
        if not self._items:
            self._waiter = waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return _event(self._items.popleft())

    def ready(self) -> ChoiceEvent | None | object:
        """As ``next`` when an item is queued already, else ``WAIT``."""
        return _event(self._items.popleft()) if self._items else WAIT


def _event(item: ChoiceEvent | Exception | None) -> ChoiceEvent | None:
    if isinstance(item, Exception):
        raise item
    return item


class ChunkFrame:
    """The pre-encoded bytes around the choices of a request's chunks: ``event(choice)`` is
    ``sse.event(oai.chunk(req, request_id, [choice]))``, byte for byte, without building or
    encoding the rest of the chunk for every event."""

    __slots__ = ("head", "tail")

    def __init__(self, req: oai.ParsedRequest, request_id: str):
        # the key in quotes can only be the key itself: a quote inside a JSON string is escaped
        head, tail = sse.event(oai.chunk(req, request_id, [])).split(b'"choices":[]', 1)
        self.head, self.tail = head + b'"choices":[', b"]" + tail

    def event(self, choice: dict) -> bytes:
        return self.head + sse.encode(choice) + self.tail


class SSEWriter:
    """The SSE body of ``run`` from its ``first`` event on; closes the run with its status when it
    ends by itself (200, or the error's status).

    A chat choice opens with a role-only chunk (``delta: {"role": "assistant", "content": ""}``),
    as OpenAI, vLLM and SGLang send it, so that clients take every later chunk for output; it
    leaves in the same write as the choice's first piece, which comes with the first event and
    starts with the choice's echoed text (``echo``).  Events already queued when one is written
    leave in the same write; the last choice's last piece waits for the run's end (queued at once)
    to leave with ``[DONE]``.
    """

    __slots__ = ("run", "events", "first")

    def __init__(self, run: RequestRun, events: EventQueue, first: ChoiceEvent | None):
        self.run, self.events, self.first = run, events, first

    async def body(self) -> AsyncIterator[bytes]:
        run, req = self.run, self.run.req
        frame = ChunkFrame(req, run.request_id)
        offsets = [0] * len(run.stats)
        unopened = set(range(len(run.stats)))
        unfinished = len(run.stats)
        batch: list[bytes] = []
        try:
            event = self.first
            while event is not None:
                piece = event.piece
                opening = event.index in unopened
                text = req.echo_text(event.index) + piece.text if opening else piece.text
                logprobs = None
                if req.logprobs:
                    entries = logprob_entries(event)
                    if req.kind == "completion":
                        logprobs = oai.completion_logprobs(entries, offsets[event.index])
                    else:
                        logprobs = oai.chat_logprobs(entries)
                offsets[event.index] += len(piece.text)
                if opening:
                    unopened.remove(event.index)
                    if req.kind == "chat":
                        batch.append(frame.event(oai.role_chunk_choice(event.index)))
                batch.append(frame.event(oai.chunk_choice(req.kind, event.index, text, piece.finish_reason, logprobs)))
                unfinished -= piece.finish_reason is not None
                event = self.events.ready()
                if event is WAIT:
                    if unfinished:  # else only the run's end is to come, at once: it leaves with this batch
                        yield b"".join(batch)
                        batch = []
                    event = await self.events.next()
            if req.include_usage:
                batch.append(sse.event(oai.chunk(req, run.request_id, [], usage(req, run.stats))))
            run.close(200)
            batch.append(sse.DONE)
            yield b"".join(batch)
        except APIError as e:
            run.close(e.status)
            log.warning("request %s failed mid-stream: %s", run.request_id, e.message)
            batch += (sse.event(e.body()), sse.DONE)
            yield b"".join(batch)
