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
"""

from __future__ import annotations

from typing import Literal, Union

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


# --- Registry ----------------------------------------------------------------


class Register(Message):
    instance: Instance
    protocol_version: int = PROTOCOL_VERSION


class Registered(Message):
    lease_ttl_s: float
    heartbeat_interval_s: float


class Heartbeat(Message):
    instance_id: str
    load: Load


class Deregister(Message):
    instance_id: str


class ListInstances(Message):
    role: Role | None = None


class InstanceList(Message):
    instances: list[Instance]


class Watch(Message):
    """Stream: one ``InstanceList`` snapshot, then a ``MembershipEvent`` per change."""


MembershipChange = Literal["joined", "updated", "left", "expired"]


class MembershipEvent(Message):
    change: MembershipChange
    instance: Instance


# --- Engine requests ---------------------------------------------------------


class SamplingParams(msgspec.Struct, omit_defaults=True):
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    seed: int | None = None
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k >= 0: chosen token + top-k


class ChatMessage(msgspec.Struct, omit_defaults=True):
    role: str
    content: str


class TokenLogprob(msgspec.Struct, omit_defaults=True):
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = []  # (token_id, logprob), best first
    token: str = ""  # the token's text, as the engine's tokenizer decodes it alone
    top_tokens: list[str] = []  # texts of ``top``, same order


class KVTransferParams(msgspec.Struct, omit_defaults=True):
    """What prefill hands back so that a decode engine can read the prompt's KV."""

    engine_id: str
    kv_endpoint: str
    transfer_id: str
    block_ids: list[int]
    num_tokens: int
    first_token_id: int
    lease_expiry: float  # unix time; prefill frees the blocks after it unless renewed
    first_token_logprob: TokenLogprob | None = None
    incarnation: str = ""  # names the prefill's KV memory, as its handshake does: a restarted prefill's differs
    block_size: int = 0  # tokens per block of ``block_ids`` (the prefill's); 0: the decode's own (older senders)
    tensor_parallel_size: int = 1  # the prefill instance's ranks, each holding its slice of the KV heads
    lease_slot: int = -1  # the lease's slot in the prefill's lease table (handshake ``lease_table``); -1: none
    lease_generation: int = 0  # the slot's generation while this lease holds it (a same-host reader checks it)


class PushTarget(msgspec.Struct, omit_defaults=True):
    """Push mode: decode's pre-allocated blocks for a prompt, held under its lease ``transfer_id`` (protocol.md)."""

    engine_id: str
    kv_endpoint: str
    transfer_id: str
    block_ids: list[int]  # decode's blocks for the prompt's tokens, ``block_size`` tokens each
    num_tokens: int  # the prompt's
    num_cached_tokens: int  # leading tokens decode already holds (prefix-cache hits): not written
    block_size: int
    lease_expiry: float  # unix time; decode frees the blocks after it unless confirmed
    incarnation: str = ""
    tensor_parallel_size: int = 1


class Generate(Message):
    """Run a request.  Exactly one of ``prompt``, ``prompt_token_ids``, ``messages``.

    ``do_remote_decode``: prefill only — stop after the first token and pin the
    prompt's blocks for a decode engine.  ``remote_prefill``: decode only — read
    the prompt's KV from that prefill engine instead of computing it.
    Push mode: ``await_push`` (decode: answer a ``PushTarget``, decode once pushed), ``push_to`` (prefill).
    The engine streams ``TokenOutput`` messages; the last has ``finish_reason``.
    """

    request_id: str
    sampling: SamplingParams
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[ChatMessage] | None = None
    do_remote_decode: bool = False
    remote_prefill: KVTransferParams | None = None
    await_push: bool = False
    push_to: PushTarget | None = None


def gives_one_prompt(msg: Generate) -> bool:
    """The rule every engine applies: exactly one of ``prompt``, ``prompt_token_ids``, ``messages``."""
    return sum(x is not None for x in (msg.prompt, msg.prompt_token_ids, msg.messages)) == 1


class Usage(msgspec.Struct, omit_defaults=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


class TokenOutput(Message):
    """A streamed piece of a request's output."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "remote_decode"
    usage: Usage | None = None  # on the final output
    prompt_token_ids: list[int] | None = None  # on the first output of a prefill
    kv_transfer: KVTransferParams | None = None  # prefill with do_remote_decode
    push_target: PushTarget | None = None  # decode with await_push: the first output, before any token
    timings: dict[str, float] | None = None  # named durations in seconds (queue, prefill, ...)


class Abort(Message):
    request_id: str


class GetStats(Message):
    pass


class Tokenize(Message):
    """The token ids the engine's tokenizer gives ``prompt`` or ``messages`` (exactly one; messages rendered
    by the chat template, as ``Generate`` renders them with the defaults).  Answered with ``Tokenized``."""

    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class Tokenized(Message):
    token_ids: list[int]
    max_model_len: int
    token_strs: list[str] | None = None  # the vocabulary string of each id, when asked


class Detokenize(Message):
    """The text of ``token_ids`` (special tokens kept, as vLLM's ``/detokenize`` gives it).  Answered with
    ``Detokenized``."""

    token_ids: list[int]


class Detokenized(Message):
    text: str


class EngineStats(Message):
    instance_id: str
    role: Role
    load: Load
    num_requests_finished: int = 0
    num_transfers_active: int = 0
    kv_transports: dict[str, str] = {}  # decode: prefill engine id -> the KV transport chosen for it
    num_preemptions: int = 0  # sequences preempted (their blocks freed, recomputed later) since the engine started


# --- KV side channel (decode -> prefill) -------------------------------------


class MemoryRegion(msgspec.Struct, frozen=True):
    addr: int
    length: int


class Handshake(Message):
    engine_id: str
    fingerprint: Fingerprint
    protocol_version: int = PROTOCOL_VERSION


class TransportOffer(msgspec.Struct, frozen=True):
    """One way to read an engine's KV: ``name`` is ``nvlink``, ``shm``, ``rdma`` or ``tcp``."""

    name: str
    backend: str  # the backend serving it: "mooncake", "mori", "shm", "nvlink"
    session: str  # the backend's address for this engine (Mooncake session name...)
    meta: bytes = b""  # backend-specific opaque blob (MoRI engine descriptor, shared-memory file...)


class KVRankMemory(msgspec.Struct, frozen=True):
    """One tensor-parallel rank's KV cache as a reader addresses it: the KV heads it holds, where
    its blocks live, and the transports it is served over (each rank registers its own memory)."""

    rank: int
    first_head: int  # global index of its first KV head
    num_heads: int  # KV heads it holds: [first_head, first_head + num_heads)
    host_id: str  # hostname + boot id: equal ids can share memory
    memory: str  # where the KV lives: "cpu" or "cuda"
    transports: list[TransportOffer]  # what this rank serves, fastest first
    region: MemoryRegion  # its registered KV memory
    block_bytes: int  # bytes of one block (its heads, all layers, K and V)
    num_blocks: int


class HandshakeReply(Message):
    engine_id: str
    fingerprint: Fingerprint
    ranks: list[KVRankMemory]  # one per tensor-parallel rank, in rank order
    incarnation: str = ""  # names this instance's KV memory: a reader mapped an older one must handshake again
    lease_table: str = ""  # its ``/dev/shm`` lease table: a same-host reader confirms leases there, not over the bus


class RenewLease(Message):
    """Keep these transfers' blocks pinned.  The first peer to renew (or release) a transfer claims it:
    the ids another peer claimed are answered as unknown ones."""

    transfer_ids: list[str]


class LeaseRenewed(Message):
    expiry: dict[str, float]  # transfer id -> new expiry; unknown ids (or another reader's) are absent
    block_ids: dict[str, list[int]] = {}  # transfer id -> the blocks its lease holds, for each id in ``expiry``


class PushDone(Message):
    """Push mode, prefill -> decode: every rank wrote the prompt's KV; decode decodes from ``first_token_id``."""

    transfer_id: str
    first_token_id: int


class ReleaseKV(Message):
    """Decode is done with these transfers: prefill unpins (only for their claimer).  Push mode: the writer stopped."""

    transfer_ids: list[str]


# --- Inside one tensor-parallel instance: rank 0 -> a worker rank's KV agent ---


class RankConnect(Message):
    """Prepare to read a peer rank over ``transport`` (its offer's ``session`` and ``meta``)."""

    transport: str
    session: str
    meta: bytes = b""


class RankRead(Message):
    """Copy each remote range of the peer rank at ``session`` into this rank's KV memory (``write``: the reverse)."""

    transport: str
    session: str
    local_addrs: list[int]
    remote_addrs: list[int]
    lengths: list[int]
    write: bool = False


class RankReadDone(Message):
    """A ``RankRead`` ended: the indices of the ranges that failed (none: every range was copied)."""

    failed: list[int]
    seconds: float  # inside the backend


# --- Unions ------------------------------------------------------------------

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
