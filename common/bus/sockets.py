"""Socket options shared by both ends of the bus, the flags it passes, and its non-blocking send."""

from __future__ import annotations

import zmq

# Plain ints: pyzmq's enum flags cost a Python-level enum operation on every use.
NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
EVENTS, POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


def tune(sock: zmq.Socket, max_frame_bytes: int) -> None:
    """Socket options shared by both ends; each one is a deliberate choice."""
    # Closing must never wait for undelivered messages to a peer that may be gone.
    sock.setsockopt(zmq.LINGER, 0)
    # Bounded queues: a stuck peer costs at most this many queued messages, never
    # unbounded memory; beyond it sends fail fast (EAGAIN) instead of blocking.
    sock.setsockopt(zmq.SNDHWM, 10_000)
    sock.setsockopt(zmq.RCVHWM, 10_000)
    # ZMTP heartbeats find peers that vanished without closing TCP (power loss,
    # partition) so their connection is dropped and pending calls fail.
    sock.setsockopt(zmq.HEARTBEAT_IVL, 1_000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5_000)
    # Hard cap well above the application limit: frames between the two get a
    # typed "too_large" answer, anything beyond is dropped by libzmq before it
    # can exhaust memory.
    sock.setsockopt(zmq.MAXMSGSIZE, 4 * max_frame_bytes + (1 << 20))


def send_frames(sock: zmq.Socket, frames: list[bytes]) -> None:
    """One multipart message without blocking; raises zmq.Again when the peer's queue is full."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, NOBLOCK if i == last else _SNDMORE_NOBLOCK)
