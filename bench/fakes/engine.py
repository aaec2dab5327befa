"""``FakeEngine``: an engine instance of any role with a fake model behind production parts.

What is real: the bus (``BusServer`` on the request and KV endpoints), the
registration and heartbeats (``RegistryClient``), and on each P/D leg what the
production roles use.  A prefill leg opens its transfer in the real
``PrefillHandoff`` and ends by pinning and leasing the prompt's blocks through
it (``FakePrefillKV``: the handoff, its lease sweeper and the real side
channel).  A decode leg "reads" for ``transfer_delay_s`` (abortable) and sends
``ReleaseKV`` through the real ``ReleaseSender`` whatever happened.  Text with
stop strings comes from the real ``Detokenizer`` (matching, hold-back) over the
byte tokenizer; without stop strings nothing is held back and each token's text
goes out as it is (that keeps the fakes cheap for the gateway benchmark).

Roles serve what production serves: every role serves a plain ``Generate``
colocated; only ``prefill`` takes ``do_remote_decode``, only ``decode``
``remote_prefill``.

What is fake: the model (``bench.fakes.model``), the KV memory (a running
request holds ceil(tokens / block_size) blocks) and the prefix cache reported
as ``usage.cached_tokens`` (decode reports the whole prompt, its local view,
which the gateway must NOT pass on).  Failure injection: ``kill()`` (sockets
closed, no deregistration, like SIGKILL), ``faults`` (``FaultPlan``), delays
per phase.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial

from bench.fakes.model import ByteTokenizer, PrefixCache, logprob_of, prompt_key, token_at
from bench.fakes.prefill_kv import BLOCK_BYTES, FakePrefillKV
from bench.fakes.transport import FakeTransport
from common.arith import ceil_div
from common.bus import BusServer
from common.bus.curve import ENGINE_ADMITS, KV_ADMITS
from common.bus.server import require_sender, sender
from common.client_pool import ClientPool
from common.engine.detokenizer import Detokenizer
from common.engine_service.prompt import prompt_token_ids
from common.errors import BusError, PeerError
from common.kv_transfer.reader import ReleaseSender
from common.messages import (
    Abort,
    Ack,
    Capacity,
    EngineRequest,
    EngineStats,
    Fingerprint,
    Generate,
    GetStats,
    Instance,
    KVRequest,
    KVTransferParams,
    Load,
    Role,
    TokenLogprob,
    TokenOutput,
    Usage,
)
from common.discovery import Registration, registration_for

log = logging.getLogger(__name__)

HISTORY = 10_000  # requests and aborts a fake remembers
KV_RPC_TIMEOUT_S = 2.0  # ReleaseKV calls of a fake decode

HandOff = Callable[[TokenOutput], str]
"""A prefill leg's end: completes the first output, returns its finish reason."""


def fingerprint(model: str, block_size: int) -> Fingerprint:
    """The KV fingerprint every fake of ``model`` shares (so the registry and handshakes accept them)."""
    return Fingerprint(model=model, dtype="float32", block_size=block_size, num_layers=2, num_kv_heads=2,
                       head_dim=8, kv_layout="head-major", transfer_backend=FakeTransport.name)


@dataclass
class FaultPlan:
    """Injected misbehaviour: ``stall_after`` outputs then hang; ``fail_code`` answers every Generate."""

    stall_after: int | None = None
    fail_code: str | None = None


@dataclass
class Running:
    """A request holding ``blocks``; ``aborted`` is set by its ``Abort``."""

    request_id: str
    blocks: int
    aborted: asyncio.Event = field(default_factory=asyncio.Event)


class FakeEngine:
    """One fake instance of ``role``; ``await start()`` binds and registers, ``await stop()`` leaves."""

    def __init__(self, role: Role, registry: str, *, id: str | None = None, model: str = "fake",
                 block_size: int = 4, num_blocks: int = 4096, max_model_len: int = 512,
                 prefill_delay_s: float = 0.0, transfer_delay_s: float = 0.0, token_delay_s: float = 0.0,
                 lease_s: float = 30.0, lease_sweep_s: float = 1.0, tokens_per_output: int = 1,
                 host: str = "127.0.0.1", max_num_seqs: int = 256):
        self.role = role
        self.registry = registry
        self.id = id or f"fake-{role}-{uuid.uuid4().hex[:6]}"
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs  # registered capacity only: a fake runs whatever it is sent
        self.prefill_delay_s = prefill_delay_s
        self.transfer_delay_s = transfer_delay_s
        self.token_delay_s = token_delay_s
        self.tokens_per_output = tokens_per_output  # decode/colocated tokens batched into one TokenOutput
        self.faults = FaultPlan()
        self.fingerprint = fingerprint(model, block_size)
        self.tokenizer = ByteTokenizer()
        self.prefix_cache = PrefixCache(block_size)
        self.server = BusServer(f"tcp://{host}:0", EngineRequest, name=self.id, admits=ENGINE_ADMITS)
        self.kv_server = BusServer(f"tcp://{host}:0", KVRequest, name=f"{self.id}-kv", admits=KV_ADMITS)
        self.server.on(Generate, self._generate)
        self.server.on(Abort, self._abort)
        self.server.on(GetStats, self._stats)
        self.running: dict[str, Running] = {}
        self.running_blocks = 0  # sum of running[*].blocks, kept as they change
        # The latest requests and aborts, for tests to inspect; bounded because a benchmark sends
        # millions, and an ever-growing heap makes the full garbage collections ever slower.
        self.received: deque[Generate] = deque(maxlen=HISTORY)
        self.aborts: deque[str] = deque(maxlen=HISTORY)
        self.finished = 0
        self.instance: Instance | None = None
        # What each P/D leg uses: prefill's pinned KV, decode's release sender.
        self.prefill_kv: FakePrefillKV | None = None
        self.releases: ReleaseSender | None = None
        if role == "prefill":
            self.prefill_kv = FakePrefillKV(self.id, self.fingerprint, self.kv_server, num_blocks, lease_s,
                                            lease_sweep_s)
        elif role == "decode":
            self.releases = ReleaseSender(ClientPool(name=f"{self.id}-kv", timeout=KV_RPC_TIMEOUT_S))
        self._registry_client: Registration | None = None
        self._heartbeats: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> Instance:
        if self.prefill_kv is not None:
            self.prefill_kv.start()
        await self.server.start()
        await self.kv_server.start()
        self.instance = Instance(
            id=self.id, role=self.role, request_endpoint=self.server.endpoint, kv_endpoint=self.kv_server.endpoint,
            model=self.model, fingerprint=self.fingerprint,
            capacity=Capacity(max_num_seqs=self.max_num_seqs, num_kv_blocks=self.num_blocks,
                              max_model_len=self.max_model_len),
            load=self.load())
        self._registry_client = registration_for(self.registry, timeout=2.0)
        await self._registry_client.register(self.instance)
        self._heartbeats = asyncio.create_task(
            self._registry_client.heartbeat_loop(self.instance, self.load, registered=True))
        return self.instance

    async def kill(self) -> None:
        """Vanish like a SIGKILLed process: no deregistration, sockets closed, work dropped."""
        await self._shutdown(polite=False)

    async def stop(self) -> None:
        """Leave politely: deregister, close, release what is still pinned."""
        await self._shutdown(polite=True)

    async def _shutdown(self, polite: bool) -> None:
        if self._heartbeats is not None:
            self._heartbeats.cancel()
            await asyncio.gather(self._heartbeats, return_exceptions=True)
            self._heartbeats = None
        if self._registry_client is not None:
            if polite:
                try:
                    await self._registry_client.deregister(self.id)
                except BusError as e:
                    log.warning("%s: deregister failed: %s", self.id, e)
            await self._registry_client.close()
            self._registry_client = None
        await self.server.close()
        await self.kv_server.close()
        if self.prefill_kv is not None:
            await self.prefill_kv.shutdown(release=polite)
        if self.releases is not None:
            await self.releases.flush()  # bounded by the clients' timeout
            await self.releases.clients.close()

    # -- accounting --------------------------------------------------------------

    def load(self) -> Load:
        pinned = self.prefill_kv.pinned_blocks if self.prefill_kv is not None else 0
        return Load(running=len(self.running), waiting=0, kv_blocks_used=self.running_blocks + pinned,
                    kv_blocks_total=self.num_blocks, kv_blocks_pinned=pinned)

    def _allocate(self, request_id: str, tokens: int) -> Running:
        blocks = ceil_div(tokens, self.block_size)
        if self.load().kv_blocks_used + blocks > self.num_blocks:
            raise PeerError("overloaded", f"{self.id}: no free KV blocks for {blocks} more")
        entry = Running(request_id, blocks)
        self.running[request_id] = entry
        self.running_blocks += blocks
        return entry

    def _free(self, request_id: str) -> None:
        entry = self.running.pop(request_id, None)
        if entry is not None:
            self.running_blocks -= entry.blocks

    # -- handlers ------------------------------------------------------------------

    async def _stats(self, msg: GetStats) -> EngineStats:
        transfers = len(self.prefill_kv.handoff.leases) if self.prefill_kv is not None else 0
        return EngineStats(instance_id=self.id, role=self.role, load=self.load(), num_requests_finished=self.finished,
                           num_transfers_active=transfers)

    async def _abort(self, msg: Abort) -> Ack:
        self.aborts.append(msg.request_id)
        entry = self.running.get(msg.request_id)
        if entry is not None:
            entry.aborted.set()
        if self.prefill_kv is not None:
            self.prefill_kv.handoff.abort(msg.request_id, sender())
        return Ack()

    async def _generate(self, gen: Generate) -> AsyncIterator[TokenOutput]:
        require_sender("gateway", "send Generate")
        self.received.append(gen)
        async for out in self._route(gen):
            yield out

    def _route(self, gen: Generate) -> AsyncIterator[TokenOutput]:
        """Refuse what this role does not serve (as the production service does), else the leg's stream."""
        if self.faults.fail_code is not None:
            raise PeerError(self.faults.fail_code, f"{self.id}: injected failure")
        if gen.do_remote_decode and self.prefill_kv is None:
            raise PeerError("invalid_request", f"{self.id} has role {self.role}, not prefill", "do_remote_decode")
        if gen.remote_prefill is not None and self.releases is None:
            raise PeerError("invalid_request", f"{self.id} has role {self.role}, not decode", "remote_prefill")
        if gen.request_id in self.running:
            raise PeerError("invalid_request", f"request {gen.request_id!r} is already running here", "request_id")
        if gen.remote_prefill is not None:
            return self._decode_leg(gen, gen.remote_prefill)
        if gen.do_remote_decode:
            return self._prefill_leg(gen)
        prompt_ids = self._prompt_ids(gen)
        return self._compute(gen, prompt_ids, len(prompt_ids) + gen.sampling.max_tokens)

    def _prompt_ids(self, gen: Generate) -> list[int]:
        """The prompt, checked against the context like a real engine checks it."""
        prompt_ids = prompt_token_ids(self.tokenizer, gen)
        if not prompt_ids:
            raise PeerError("invalid_request", "the prompt is empty", "prompt")
        if len(prompt_ids) >= self.max_model_len:
            raise PeerError("invalid_request", f"prompt of {len(prompt_ids)} tokens does not fit the context of "
                            f"{self.max_model_len}", "messages" if gen.messages is not None else "prompt")
        if len(prompt_ids) + gen.sampling.max_tokens > self.max_model_len:
            raise PeerError("invalid_request", f"prompt ({len(prompt_ids)} tokens) + max_tokens "
                            f"({gen.sampling.max_tokens}) exceeds the context of {self.max_model_len}", "max_tokens")
        return prompt_ids

    # -- the legs ------------------------------------------------------------------

    async def _prefill_leg(self, gen: Generate) -> AsyncIterator[TokenOutput]:
        """Compute the prompt and first token, then pin the prompt's blocks for a decode engine."""
        prompt_ids = self._prompt_ids(gen)
        handoff = self.prefill_kv.handoff
        handoff.begin(gen.request_id, sender())
        try:
            hand_off = partial(self.prefill_kv.hand_off, len(prompt_ids))
            async for out in self._compute(gen, prompt_ids, len(prompt_ids), hand_off):
                yield out
        finally:
            handoff.settle(gen.request_id)

    async def _decode_leg(self, gen: Generate, params: KVTransferParams) -> AsyncIterator[TokenOutput]:
        """"Read" the prompt's blocks, send ``ReleaseKV`` whatever happened, then go on from token 1."""
        try:
            prompt_ids = self._prompt_ids(gen)
            entry = self._allocate(gen.request_id, len(prompt_ids) + gen.sampling.max_tokens)
        except PeerError:
            self.releases.send(params)  # prefill must not keep blocks nobody will read
            raise
        try:
            try:
                aborted = await self._wait(entry, self.transfer_delay_s)
            finally:
                self.releases.send(params)
            if aborted:
                yield self._aborted(gen)
                return
            timings = {"kv_transfer_s": self.transfer_delay_s, "kv_bytes": float(len(params.block_ids) * BLOCK_BYTES),
                       "first_decode_step_s": self.token_delay_s}
            detokenizer = self._detokenizer(gen, prompt_ids)
            stopped = detokenizer is not None and detokenizer.append_emitted(params.first_token_id) is not None
            if stopped or gen.sampling.max_tokens <= 1:
                out = TokenOutput(request_id=gen.request_id, token_ids=[], text="", timings=timings)
                yield self._finish(out, "stop" if stopped else "length", len(prompt_ids), 1, len(prompt_ids))
                return
            async for out in self._tokens(gen, entry, prompt_ids, detokenizer, 1, len(prompt_ids), timings):
                yield out
        finally:
            self._free(gen.request_id)

    async def _compute(self, gen: Generate, prompt_ids: list[int], num_tokens: int,
                       hand_off: HandOff | None = None) -> AsyncIterator[TokenOutput]:
        """The prompt computed here holding blocks for ``num_tokens``, then tokens from the first
        (colocated; a prefill leg ends after it in ``hand_off``)."""
        entry = self._allocate(gen.request_id, num_tokens)
        try:
            cached = self.prefix_cache.hit_tokens(prompt_ids)
            if await self._wait(entry, self.prefill_delay_s):
                yield self._aborted(gen)
                return
            detokenizer = self._detokenizer(gen, prompt_ids)
            timings = {"queue_s": 0.0, "prefill_s": self.prefill_delay_s}
            async for out in self._tokens(gen, entry, prompt_ids, detokenizer, 0, cached, timings, hand_off):
                yield out
        finally:
            self._free(gen.request_id)

    def _detokenizer(self, gen: Generate, prompt_ids: list[int]) -> Detokenizer | None:
        """The engine's text maker when there are stop strings to match and hold back; None otherwise."""
        return Detokenizer(self.tokenizer, prompt_ids, gen.sampling.stop) if gen.sampling.stop else None

    async def _tokens(self, gen: Generate, entry: Running, prompt_ids: list[int], detokenizer: Detokenizer | None,
                      start: int, cached: int, timings: dict[str, float],
                      hand_off: HandOff | None = None) -> AsyncIterator[TokenOutput]:
        """Output tokens ``start``.. in outputs of ``tokens_per_output`` (one, then ``hand_off``, on a
        prefill leg); ``timings`` ride on the first output."""
        sampling = gen.sampling
        key = prompt_key(prompt_ids)
        ids: list[int] = []
        text = ""
        logprobs: list[TokenLogprob] = []
        outputs = 0
        for i in range(start, sampling.max_tokens):
            if self.faults.stall_after is not None and outputs >= self.faults.stall_after:
                await entry.aborted.wait()  # hang until aborted or cancelled
                yield self._aborted(gen)
                return
            if i > start and await self._wait(entry, self.token_delay_s):
                yield self._aborted(gen)
                return
            token = token_at(key, sampling, i)
            ids.append(token)
            if detokenizer is None:  # nothing to hold back: the token's text goes out at once
                stopped, last = False, i == sampling.max_tokens - 1
                text += chr(token)
            else:
                stopped = detokenizer.append(token) is not None
                last = stopped or i == sampling.max_tokens - 1
                text += detokenizer.take(final=last or hand_off is not None)
            if sampling.logprobs is not None:
                logprobs.append(logprob_of(token, i, sampling.logprobs))
            finish = ("stop" if stopped else "length") if last else None
            if finish is None and hand_off is None and len(ids) < self.tokens_per_output:
                continue
            out = TokenOutput(request_id=gen.request_id, token_ids=ids, text=text, timings=timings or None,
                              logprobs=logprobs if sampling.logprobs is not None else None)
            ids, text, logprobs, timings = [], "", [], {}
            if i == 0:
                out.prompt_token_ids = prompt_ids
            if finish is None and hand_off is not None:
                finish = hand_off(out)
            outputs += 1
            if finish is not None:
                yield self._finish(out, finish, len(prompt_ids), i + 1, cached)
                return
            yield out

    def _finish(self, out: TokenOutput, reason: str, prompt_tokens: int, completion_tokens: int,
                cached: int) -> TokenOutput:
        """Make ``out`` the request's final output."""
        self.finished += 1
        out.finish_reason = reason
        out.usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, cached_tokens=cached)
        return out

    async def _wait(self, entry: Running, delay: float) -> bool:
        """Sleep ``delay``; True if the request was aborted meanwhile."""
        if delay <= 0:
            return entry.aborted.is_set()
        try:
            await asyncio.wait_for(entry.aborted.wait(), delay)
            return True
        except TimeoutError:
            return False

    def _aborted(self, gen: Generate) -> TokenOutput:
        return TokenOutput(request_id=gen.request_id, token_ids=[], text="", finish_reason="abort")
