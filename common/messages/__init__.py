"""Every message that crosses a process boundary.

Each message is a ``msgspec.Struct`` tagged with its class name and travels as
msgpack inside one bus frame (see ``common.bus``).  Three tagged unions say what
each socket accepts:

* ``RegistryRequest``  -> the registry's ROUTER
* ``EngineRequest``    -> an engine's request ROUTER
* ``KVRequest``        -> an engine's KV side channel ROUTER
* ``RankRequest``      -> a tensor-parallel rank's KV agent (inside one engine instance)

Replies are members of ``Reply``.  ``docs/protocol.md`` lists who sends what.
No pickle anywhere: a peer can only ever make us build these types.

The messages live in ``base`` (the ``Message`` base, shared records, generic
replies, ``PROTOCOL_VERSION``), ``registry``, ``engine`` and ``kv`` (the KV side
channel and the rank agents); import them from here.
"""

from __future__ import annotations

from typing import Union

from common.messages.base import (  # noqa: F401
    PROTOCOL_VERSION,
    MAX_LOGPROBS,
    Role,
    KVMode,
    Message,
    Fingerprint,
    Capacity,
    Load,
    Instance,
    Ack,
    ErrorCode,
    ErrorReply,
)
from common.messages.engine import (  # noqa: F401
    SamplingParams,
    ChatMessage,
    TokenLogprob,
    KVTransferParams,
    PushTarget,
    Generate,
    gives_one_prompt,
    Usage,
    TokenOutput,
    Abort,
    GetStats,
    Tokenize,
    Tokenized,
    Detokenize,
    Detokenized,
    EngineStats,
)
from common.messages.kv import (  # noqa: F401
    MemoryRegion,
    Handshake,
    TransportOffer,
    KVRankMemory,
    HandshakeReply,
    RenewLease,
    LeaseRenewed,
    PushDone,
    ReleaseKV,
    RankConnect,
    RankRead,
    RankReadDone,
)
from common.messages.registry import (  # noqa: F401
    Register,
    Registered,
    Heartbeat,
    Deregister,
    ListInstances,
    InstanceList,
    Watch,
    MembershipChange,
    MembershipEvent,
)

RegistryRequest = Union[Register, Heartbeat, Deregister, ListInstances, Watch]
EngineRequest = Union[Generate, Abort, GetStats, Tokenize, Detokenize]
KVRequest = Union[Handshake, RenewLease, ReleaseKV, PushDone]
RankRequest = Union[RankConnect, RankRead]
Reply = Union[
    Ack,
    ErrorReply,
    Registered,
    InstanceList,
    MembershipEvent,
    TokenOutput,
    EngineStats,
    Tokenized,
    Detokenized,
    HandshakeReply,
    LeaseRenewed,
    RankReadDone,
]
