"""The wire's common ground: the ``Message`` base, the records several messages carry, generic replies."""

from __future__ import annotations

from typing import Literal

import msgspec

PROTOCOL_VERSION = 4  # 2: the handshake offers several KV transports; 3: one KV memory per tensor-parallel rank;
# 4: ``LeaseRenewed`` names the blocks each lease holds (a reader refuses a lease without them)
MAX_LOGPROBS = 20  # most top logprobs a request may ask for (engine and gateway agree)

Role = Literal["prefill", "decode", "both"]
KVMode = Literal["read", "push"]


class Message(msgspec.Struct, tag=True, omit_defaults=True, forbid_unknown_fields=False):
    """Base of all wire messages: the tag is the class name."""


# --- Shared records ----------------------------------------------------------


class Fingerprint(msgspec.Struct, frozen=True, omit_defaults=True):
    """What two engines must agree on before one may read the other's KV blocks."""

    model: str
    dtype: str
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_layout: str
    transfer_backend: str
    tensor_parallel_size: int = 1  # ranks of the instance, each holding its slice of the KV heads

    def differences(self, other: "Fingerprint") -> list[str]:
        """Names of the fields whose values differ, e.g. ``["block_size"]``."""
        return [f for f in self.__struct_fields__ if getattr(self, f) != getattr(other, f)]


class Capacity(msgspec.Struct, frozen=True, omit_defaults=True):
    max_num_seqs: int
    num_kv_blocks: int
    max_model_len: int


class Load(msgspec.Struct, omit_defaults=True):
    """An engine's load, sent in every heartbeat."""

    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    kv_blocks_pinned: int = 0


class Instance(msgspec.Struct, omit_defaults=True):
    """One registered engine instance."""

    id: str
    role: Role
    request_endpoint: str
    kv_endpoint: str
    model: str
    fingerprint: Fingerprint
    capacity: Capacity
    load: Load = msgspec.field(default_factory=Load)
    kv_mode: KVMode = "read"  # how its KV moves between prefill and decode (``--kv-mode``)


# --- Generic replies ---------------------------------------------------------


class Ack(Message):
    pass


ErrorCode = Literal[
    "bad_frame",  # undecodable / malformed / unknown tag
    "too_large",  # frame over the receiver's max size
    "unsupported",  # valid message this socket does not handle
    "protocol_version",
    "invalid_request",  # request-level validation failed (OpenAI 400)
    "unknown_instance",
    "forbidden",  # the sender's key may not do this (another key owns the instance, or its role may not)
    "incompatible",
    "overloaded",
    "shutting_down",
    "kv_transfer_failed",
    "internal",
]


class ErrorReply(Message):
    """A typed failure; the bus client raises it as ``common.errors.PeerError``."""

    code: ErrorCode
    message: str
    param: str | None = None
