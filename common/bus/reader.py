"""Reading a zmq socket from the event loop without a task per socket."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import zmq

from common.bus.sockets import EVENTS, NOBLOCK, POLLIN

log = logging.getLogger(__name__)


# Frames one drain takes at most before it yields to the loop: the handlers it started, timers and the
# other sockets (the registry's heartbeats) run before it reads more, however fast a peer sends.
DRAIN_BUDGET_FRAMES = 256


class Reader:
    """Feeds every message arriving on a plain zmq socket to ``on_frames``.

    Driven by the event loop's reader on the socket's FD, so a burst of
    messages costs one wake-up.  ZMQ's FD is edge-triggered and a send can
    consume the edge, so after every send ``poke()`` re-checks for input.
    One drain reads about ``DRAIN_BUDGET_FRAMES`` frames, then reschedules
    itself: what it did not read waits in libzmq's bounded queue (RCVHWM), so a
    flooding peer meets backpressure instead of the loop stalling in here.
    """

    def __init__(self, sock: zmq.Socket, on_frames: Callable[[list[bytes]], None]):
        self._sock = sock
        self._on_frames = on_frames
        self._loop = asyncio.get_running_loop()
        self._fd = sock.getsockopt(zmq.FD)
        self._scheduled = False
        self.frame: zmq.Frame | None = None  # the last frame read: its properties (User-Id) are its message's
        self._loop.add_reader(self._fd, self._drain)
        self.poke()

    def poke(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        sock = self._sock
        budget = DRAIN_BUDGET_FRAMES
        while not sock.closed and sock.getsockopt(EVENTS) & POLLIN:
            if budget <= 0:  # more is waiting: read it on the next loop iteration
                self.poke()
                return
            # Frame objects say whether more follow; a getsockopt(RCVMORE) per frame costs more.
            frame = sock.recv(NOBLOCK, copy=False)
            frames = [frame.bytes]
            while frame.more:
                frame = sock.recv(NOBLOCK, copy=False)
                frames.append(frame.bytes)
            self.frame = frame
            budget -= len(frames)
            try:
                self._on_frames(frames)
            except Exception:  # one bad frame must never stop the reader
                log.exception("unexpected error handling a frame")

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
