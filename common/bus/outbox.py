"""Batching: the records queued for each peer during one loop iteration leave as one message."""

from __future__ import annotations

import asyncio
from typing import Callable

import zmq

from common.bus.reader import Reader
from common.bus.records import MAX_BATCH_RECORDS
from common.bus.sockets import send_frames


class Outbox:
    """Records queued per peer during one loop iteration; ``flush`` sends one message per peer.

    A peer's records leave early, without waiting for ``flush``, once
    ``MAX_BATCH_RECORDS`` are queued.  ``key`` is the ROUTER identity (its frame
    leads the message) or None on a DEALER.  ``on_failed(key, frames, error)``
    hears of a message that could not be sent: ``zmq.Again`` (the peer's queue is
    full) or ``zmq.ZMQError`` (EHOSTUNREACH: the peer is gone); ``frames`` are its
    records' frames.
    """

    def __init__(self, sock: zmq.Socket, reader: Reader,
                 on_failed: Callable[[bytes | None, list[bytes], zmq.ZMQError], None]):
        self._sock = sock
        self._reader = reader
        self._on_failed = on_failed
        self._loop = asyncio.get_running_loop()
        self._queued: dict[bytes | None, list[bytes]] = {}

    def add(self, key: bytes | None, header: bytes, body: bytes) -> None:
        frames = self._queued.get(key)
        if frames is None:
            if not self._queued:
                self._loop.call_soon(self.flush)
            self._queued[key] = [header, body] if key is None else [key, header, body]
        else:
            frames += (header, body)
            if len(frames) >= 2 * MAX_BATCH_RECORDS + (key is not None) and not self._sock.closed:
                self._send(key, self._queued.pop(key))
                self._reader.poke()

    def retag_last(self, key: bytes | None, header: bytes, new_header: bytes) -> bool:
        """If the last record queued for ``key`` has ``header``, give it ``new_header``; True if it did."""
        frames = self._queued.get(key)
        if frames is None or frames[-2] != header:
            return False
        frames[-2] = new_header
        return True

    def flush(self) -> None:
        queued, self._queued = self._queued, {}
        if self._sock.closed:
            return
        for key, frames in queued.items():
            self._send(key, frames)
        if queued:
            self._reader.poke()

    def _send(self, key: bytes | None, frames: list[bytes]) -> None:
        try:
            send_frames(self._sock, frames)
        except zmq.ZMQError as e:
            self._on_failed(key, frames if key is None else frames[1:], e)
