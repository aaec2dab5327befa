"""The bus's records: header layout, request kinds, reply flags, limits, body encoding.

A record is two frames ``[header, body]``; ``HEADER`` packs (request id, kind or
flag), ``body`` is one msgpack-encoded ``common.messages`` struct (see ``common.bus``).
"""

from __future__ import annotations

import struct

import msgspec

from common.messages import Message

HEADER = struct.Struct("!QB")
KIND_REQUEST, KIND_CANCEL = 0, 1
FLAG_ITEM, FLAG_FINAL, FLAG_END = 0, 1, 2

DEFAULT_MAX_FRAME_BYTES = 64 << 20
MAX_BATCH_RECORDS = 16  # records per ZMQ message at most (see the ``common.bus`` docstring)

_encoder = msgspec.msgpack.Encoder()


def encode(msg: Message) -> bytes:
    """``msg`` as a record body."""
    return _encoder.encode(msg)
