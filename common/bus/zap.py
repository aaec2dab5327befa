"""The ZAP handler (ZeroMQ RFC 27) that decides which CURVE clients a bus server admits.

libzmq asks the handler bound at ``inproc://zeromq.zap.01`` of the socket's context about every
CURVE handshake; no answer, no connection.  A server's ZAP domain lists the roles it admits
(``domain``); the handler admits a client whose public key the process's keys file under one of
them (``known()``: raw public key -> role) and names it ``role:z85-key``: libzmq attaches that as the
"User-Id" property of every message from the connection (``curve.peer_from_user_id``).

Why a thread of our own rather than pyzmq's ``zmq.auth`` authenticators: theirs know one key set
per domain and name a peer by its key only, ours maps each key to its role from one table; and a
thread answers handshakes while the event loop is busy, for every socket of the process's
context, which the loop-bound ``AsyncioAuthenticator`` would not.  It runs once per process, from
the first CURVE server on, and handles only handshakes: messages never pass through it.
"""

from __future__ import annotations

import logging
import threading

import zmq
from typing import Callable

from zmq.utils import z85

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_lock = threading.Lock()
_started: set[int] = set()  # ids of the contexts that have a handler


def domain(admits: frozenset[str]) -> bytes:
    """The ZAP domain of a server admitting the roles ``admits``."""
    return ",".join(sorted(admits)).encode()


def decide(frames: list[bytes], known: dict[bytes, str]) -> list[bytes]:
    """The reply to one ZAP request: 200 with the peer's User-Id, or 400."""
    version, request_id, dom, address, _identity, mechanism, *credentials = frames
    role = known.get(credentials[0]) if mechanism == b"CURVE" and credentials else None
    if role is None or role.encode() not in dom.split(b","):
        log.warning("refused a %s connection from %s (%s) to a server for %s", mechanism.decode(errors="replace"),
                    address.decode(errors="replace"), "unknown key" if role is None else f"a {role} key",
                    dom.decode(errors="replace"))
        return [version, request_id, b"400", b"key not admitted", b"", b""]
    user_id = f"{role}:{z85.encode(credentials[0]).decode()}"
    return [version, request_id, b"200", b"OK", user_id.encode(), b""]


def start(context: zmq.Context, known: Callable[[], dict[bytes, str]]) -> None:
    """Start the handler of ``context`` unless it runs already; ``known()`` is asked at each handshake."""
    with _lock:
        if id(context) in _started:
            return
        sock = context.socket(zmq.REP)
        sock.linger = 0
        sock.bind(ZAP_ENDPOINT)  # bound before any CURVE server exists: no handshake goes unchecked
        _started.add(id(context))
    threading.Thread(target=_serve, args=(sock, known), name="zap-handler", daemon=True).start()


def _serve(sock: zmq.Socket, known: Callable[[], dict[bytes, str]]) -> None:
    while True:
        try:
            frames = sock.recv_multipart()
        except zmq.ContextTerminated:
            sock.close()
            return
        try:
            reply = decide(frames, known())
        except ValueError:  # a request that is not one: libzmq never sends it
            reply = [b"1.0", frames[1] if len(frames) > 1 else b"", b"500", b"bad ZAP request", b"", b""]
        sock.send_multipart(reply)
