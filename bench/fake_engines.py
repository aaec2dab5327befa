"""Fake engine instances that speak the real engine protocol over the real bus.

They stand in for the prefill/decode/both engine services where a model is
beside the point (gateway tests, the gateway overhead benchmark):

* a ``BusServer`` on the request endpoint handling ``Generate`` (stream of
  ``TokenOutput``), ``Abort`` (-> ``Ack``) and ``GetStats`` (-> ``EngineStats``);
  a second one on the KV endpoint handling ``ReleaseKV`` and ``RenewLease``;
* registration and heartbeats with the real registry (``RegistryClient``), load
  included, so the gateway's membership and load gauges are real;
* deterministic output: the vocabulary is bytes (token id = byte value), a prompt
  is its UTF-8 bytes (chat messages rendered as ``role: content\\n`` lines plus
  ``assistant:``), and output token ``i`` is a letter picked by a hash of
  (prompt, seed if temperature > 0, i) — the same in colocated and P/D runs;
* block accounting like a real engine: a running request holds
  ceil(tokens / block_size) blocks; a prefill that hands off to decode keeps its
  prompt blocks pinned under a transfer id until the decode engine sends
  ``ReleaseKV`` (after its simulated read), an ``Abort`` of the request arrives,
  or the lease runs out; a cancelled or aborted request frees everything;
* a prefix cache over full prompt blocks (chained hashes), reported as
  ``usage.cached_tokens`` by prefill; decode reports its own (decode-local)
  cached tokens as the whole prompt, which the gateway must NOT pass on;
* failure injection: ``kill()`` (sockets closed, no deregistration, like
  SIGKILL), ``stall_after`` outputs (hang mid-stream), delays per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import math
import time
import uuid
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator

from common.bus import BusClient, BusServer
from common.errors import BusError, PeerError
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
    LeaseRenewed,
    Load,
    ReleaseKV,
    RenewLease,
    Role,
    SamplingParams,
    TokenLogprob,
    TokenOutput,
    Usage,
)
from common.registry_client import RegistryClient
from common.service import tune_gc
from services.registry.server import Registry, RegistryConfig

log = logging.getLogger(__name__)

ALPHABET = "abcdefghijklmnopqrstuvwxyz "
HISTORY = 10_000  # requests and aborts a fake remembers
BLOCK_BYTES = 4096


def fingerprint(model: str, block_size: int) -> Fingerprint:
    return Fingerprint(model=model, dtype="float32", block_size=block_size, num_layers=2, num_kv_heads=2,
                       head_dim=8, kv_layout="block-major", transfer_backend="fake")


def render_prompt(gen: Generate) -> list[int]:
    if gen.prompt_token_ids is not None:
        return list(gen.prompt_token_ids)
    if gen.messages is not None:
        text = "".join(f"{m.role}: {m.content}\n" for m in gen.messages) + "assistant:"
    else:
        text = gen.prompt or ""
    return list(text.encode())


def prompt_bytes(prompt_ids: list[int]) -> bytes:
    """The prompt as bytes (each id's low byte), what the fake hashes."""
    try:
        return bytes(prompt_ids)
    except ValueError:  # ids beyond the byte vocabulary
        return bytes(t & 0xFF for t in prompt_ids)


def prompt_key(prompt_ids: list[int]) -> int:
    return zlib.crc32(prompt_bytes(prompt_ids))


def token_at(prompt_ids: list[int] | int, sampling: SamplingParams, i: int) -> int:
    """Output token ``i`` of a prompt (its ids or ``prompt_key``): deterministic, seed-dependent when sampling."""
    key = prompt_ids if isinstance(prompt_ids, int) else prompt_key(prompt_ids)
    seed = sampling.seed if sampling.temperature > 0 and sampling.seed is not None else 0
    mixed = key ^ (seed * 0x9E3779B1) ^ (i * 0x85EBCA6B)
    return ord(ALPHABET[zlib.crc32(mixed.to_bytes(16, "little", signed=True)) % len(ALPHABET)])


def logprob_of(token: int, i: int, k: int) -> TokenLogprob:
    lp = -0.25 * (1 + i % 4)
    others = [t for t in (ord(c) for c in ALPHABET) if t != token][: max(k - 1, 0)]
    top = [(token, lp)] + [(t, lp - 1.0 - j) for j, t in enumerate(others)] if k > 0 else []
    return TokenLogprob(token_id=token, logprob=lp, top=top, token=chr(token), top_tokens=[chr(t) for t, _ in top])


class Decoder:
    """Turns output tokens into text, holding back text that could still become a stop string."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.text = ""
        self.sent = 0

    def add(self, token: int) -> tuple[str, bool]:
        """Text to emit now, and whether a stop string ended the output."""
        if not self.stops:  # nothing to hold back: every token's text goes out at once
            return chr(token), False
        self.text += chr(token)
        for s in self.stops:
            at = self.text.find(s)
            if at >= 0:
                out, self.sent = self.text[self.sent:at], at
                return out, True
        hold = max((j for s in self.stops for j in range(1, len(s)) if self.text.endswith(s[:j])), default=0)
        safe = len(self.text) - hold
        out = self.text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return out, False

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


@dataclass
class FaultPlan:
    """Injected misbehaviour: ``stall_after`` outputs then hang; ``fail_code`` answers every Generate."""

    stall_after: int | None = None
    fail_code: str | None = None


@dataclass
class Running:
    request_id: str
    blocks: int
    aborted: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Pinned:
    request_id: str
    blocks: int
    expiry: float
    timer: asyncio.TimerHandle


class FakeEngine:
    """One fake instance of ``role``; ``await start()`` binds and registers, ``await stop()`` leaves."""

    def __init__(self, role: Role, registry: str, *, id: str | None = None, model: str = "fake",
                 block_size: int = 4, num_blocks: int = 4096, max_model_len: int = 512,
                 prefill_delay_s: float = 0.0, transfer_delay_s: float = 0.0, token_delay_s: float = 0.0,
                 lease_s: float = 30.0, tokens_per_output: int = 1, host: str = "127.0.0.1"):
        self.role = role
        self.registry = registry
        self.id = id or f"fake-{role}-{uuid.uuid4().hex[:6]}"
        self.model = model
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_model_len = max_model_len
        self.prefill_delay_s = prefill_delay_s
        self.transfer_delay_s = transfer_delay_s
        self.token_delay_s = token_delay_s
        self.lease_s = lease_s
        self.tokens_per_output = tokens_per_output  # decode/colocated tokens batched into one TokenOutput
        self.faults = FaultPlan()
        self.server = BusServer(f"tcp://{host}:0", EngineRequest, name=self.id)
        self.kv_server = BusServer(f"tcp://{host}:0", KVRequest, name=f"{self.id}-kv")
        self.server.on(Generate, self._generate)
        self.server.on(Abort, self._abort)
        self.server.on(GetStats, self._stats)
        self.kv_server.on(ReleaseKV, self._release)
        self.kv_server.on(RenewLease, self._renew)
        self.running: dict[str, Running] = {}
        self.pinned: dict[str, Pinned] = {}  # transfer id -> pinned prompt blocks
        self.running_blocks = 0  # sum of running[*].blocks, kept as they change
        self.pinned_blocks = 0  # sum of pinned[*].blocks
        self.cache: set[int] = set()  # chained hashes of full prompt blocks seen
        # The latest requests and aborts, for tests to inspect; bounded because a benchmark sends
        # millions, and an ever-growing heap makes the full garbage collections ever slower.
        self.received: deque[Generate] = deque(maxlen=HISTORY)
        self.aborts: deque[str] = deque(maxlen=HISTORY)
        self.finished = 0
        self.instance: Instance | None = None
        self._registry_client: RegistryClient | None = None
        self._heartbeats: asyncio.Task | None = None
        self._kv_clients: dict[str, BusClient] = {}
        self._releases: set[asyncio.Task] = set()  # ReleaseKV calls in flight
        self._transfer_ids = itertools.count(1)

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> Instance:
        await self.server.start()
        await self.kv_server.start()
        self.instance = Instance(
            id=self.id, role=self.role, request_endpoint=self.server.endpoint, kv_endpoint=self.kv_server.endpoint,
            model=self.model, fingerprint=fingerprint(self.model, self.block_size),
            capacity=Capacity(max_num_seqs=256, num_kv_blocks=self.num_blocks, max_model_len=self.max_model_len),
            load=self.load())
        self._registry_client = RegistryClient(self.registry, timeout=2.0)
        await self._registry_client.register(self.instance)
        self._heartbeats = asyncio.create_task(
            self._registry_client.heartbeat_loop(self.instance, self.load, registered=True))
        return self.instance

    async def kill(self) -> None:
        """Vanish like a SIGKILLed process: no deregistration, sockets closed, work dropped."""
        await self._shutdown(deregister=False)

    async def stop(self) -> None:
        """Leave politely: deregister, then close."""
        await self._shutdown(deregister=True)

    async def _shutdown(self, deregister: bool) -> None:
        if self._heartbeats is not None:
            self._heartbeats.cancel()
            await asyncio.gather(self._heartbeats, return_exceptions=True)
            self._heartbeats = None
        if self._registry_client is not None:
            if deregister:
                try:
                    await self._registry_client.deregister(self.id)
                except BusError as e:
                    log.warning("%s: deregister failed: %s", self.id, e)
            await self._registry_client.close()
            self._registry_client = None
        await self.server.close()
        await self.kv_server.close()
        for p in self.pinned.values():
            p.timer.cancel()
        await asyncio.gather(*self._releases, return_exceptions=True)  # bounded by the clients' timeout
        for client in self._kv_clients.values():
            await client.close()

    # -- accounting --------------------------------------------------------------

    def load(self) -> Load:
        return Load(running=len(self.running), waiting=0, kv_blocks_used=self.running_blocks + self.pinned_blocks,
                    kv_blocks_total=self.num_blocks, kv_blocks_pinned=self.pinned_blocks)

    def _allocate(self, request_id: str, tokens: int) -> Running:
        blocks = math.ceil(tokens / self.block_size)
        if self.running_blocks + self.pinned_blocks + blocks > self.num_blocks:
            raise PeerError("overloaded", f"{self.id}: no free KV blocks for {blocks} more")
        entry = Running(request_id, blocks)
        self.running[request_id] = entry
        self.running_blocks += blocks
        return entry

    def _free(self, request_id: str) -> None:
        entry = self.running.pop(request_id, None)
        if entry is not None:
            self.running_blocks -= entry.blocks

    def _cached_tokens(self, prompt: bytes) -> int:
        """Prefix-cache hits over full blocks of ``prompt_bytes``; records its blocks for later requests."""
        h, hits, counting = 0, 0, True
        for b in range(len(prompt) // self.block_size):
            h = zlib.crc32(prompt[b * self.block_size:(b + 1) * self.block_size], h)
            if counting and h in self.cache:
                hits += 1
            else:
                counting = False
                self.cache.add(h)
        return min(hits * self.block_size, len(prompt) - 1)

    def _pin(self, request_id: str, blocks: int) -> tuple[str, float]:
        transfer_id = f"{self.id}-{request_id}-{next(self._transfer_ids)}"
        expiry = time.time() + self.lease_s
        timer = asyncio.get_running_loop().call_later(self.lease_s, self._unpin, transfer_id)
        self.pinned[transfer_id] = Pinned(request_id, blocks, expiry, timer)
        self.pinned_blocks += blocks
        return transfer_id, expiry

    def _unpin(self, transfer_id: str) -> bool:
        p = self.pinned.pop(transfer_id, None)
        if p is not None:
            p.timer.cancel()
            self.pinned_blocks -= p.blocks
        return p is not None

    # -- handlers ------------------------------------------------------------------

    async def _stats(self, msg: GetStats) -> EngineStats:
        return EngineStats(instance_id=self.id, role=self.role, load=self.load(), num_requests_finished=self.finished,
                           num_transfers_active=len(self.pinned))

    async def _abort(self, msg: Abort) -> Ack:
        self.aborts.append(msg.request_id)
        entry = self.running.get(msg.request_id)
        if entry is not None:
            entry.aborted.set()
        for tid in [t for t, p in self.pinned.items() if p.request_id == msg.request_id]:
            self._unpin(tid)
        return Ack()

    async def _release(self, msg: ReleaseKV) -> Ack:
        for tid in msg.transfer_ids:
            self._unpin(tid)
        return Ack()

    async def _renew(self, msg: RenewLease) -> LeaseRenewed:
        expiry = {}
        for tid in msg.transfer_ids:
            p = self.pinned.get(tid)
            if p is not None:
                p.timer.cancel()
                p.expiry = time.time() + self.lease_s
                p.timer = asyncio.get_running_loop().call_later(self.lease_s, self._unpin, tid)
                expiry[tid] = p.expiry
        return LeaseRenewed(expiry=expiry)

    def _validate(self, gen: Generate, prompt_ids: list[int]) -> None:
        if self.role == "prefill" and not gen.do_remote_decode:
            raise PeerError("unsupported", f"{self.id} is a prefill instance: Generate needs do_remote_decode")
        if self.role == "decode" and gen.remote_prefill is None:
            raise PeerError("unsupported", f"{self.id} is a decode instance: Generate needs remote_prefill")
        if not prompt_ids:
            raise PeerError("invalid_request", "the prompt is empty", "prompt")
        if len(prompt_ids) >= self.max_model_len:
            raise PeerError("invalid_request", f"prompt of {len(prompt_ids)} tokens does not fit the context of "
                            f"{self.max_model_len}", "messages" if gen.messages is not None else "prompt")
        if len(prompt_ids) + gen.sampling.max_tokens > self.max_model_len:
            raise PeerError("invalid_request", f"prompt ({len(prompt_ids)} tokens) + max_tokens "
                            f"({gen.sampling.max_tokens}) exceeds the context of {self.max_model_len}", "max_tokens")

    async def _wait(self, entry: Running, delay: float) -> bool:
        """Sleep ``delay``; True if the request was aborted meanwhile."""
        if delay <= 0:
            return entry.aborted.is_set()
        try:
            await asyncio.wait_for(entry.aborted.wait(), delay)
            return True
        except TimeoutError:
            return False

    async def _generate(self, gen: Generate) -> AsyncIterator[TokenOutput]:
        self.received.append(gen)
        if self.faults.fail_code is not None:
            raise PeerError(self.faults.fail_code, f"{self.id}: injected failure")
        if gen.request_id in self.running:
            raise PeerError("invalid_request", f"request {gen.request_id} is already running", "request_id")
        prompt_ids = render_prompt(gen)
        self._validate(gen, prompt_ids)
        prompt = prompt_bytes(prompt_ids)
        remote = gen.remote_prefill
        entry = self._allocate(gen.request_id, len(prompt_ids) + (0 if gen.do_remote_decode else gen.sampling.max_tokens))
        outputs = 0
        try:
            sampling = gen.sampling
            dec = Decoder(sampling.stop)
            timings: dict[str, float] = {}
            if remote is not None:  # decode: "read" the blocks, tell prefill it may unpin, then go on from token 1
                if await self._wait(entry, self.transfer_delay_s):
                    yield self._aborted(gen)
                    return
                self._release_remote(remote)
                dec.add(remote.first_token_id)
                dec.flush()
                timings = {"kv_transfer_s": self.transfer_delay_s,
                           "kv_bytes": float(len(remote.block_ids) * BLOCK_BYTES),
                           "first_decode_step_s": self.token_delay_s}
                start, cached = 1, len(prompt_ids)
            else:
                cached = self._cached_tokens(prompt)
                if await self._wait(entry, self.prefill_delay_s):
                    yield self._aborted(gen)
                    return
                timings = {"queue_s": 0.0, "prefill_s": self.prefill_delay_s}
                start = 0
            key = zlib.crc32(prompt)
            ids: list[int] = []
            text = ""
            lps: list[TokenLogprob] = []
            for i in range(start, sampling.max_tokens):
                if self.faults.stall_after is not None and outputs >= self.faults.stall_after:
                    await entry.aborted.wait()  # hang until aborted or cancelled
                    yield self._aborted(gen)
                    return
                if i > start and await self._wait(entry, self.token_delay_s):
                    yield self._aborted(gen)
                    return
                token = token_at(key, sampling, i)
                piece, stopped = dec.add(token)
                last = stopped or i == sampling.max_tokens - 1
                if last and not stopped:
                    piece += dec.flush()
                ids.append(token)
                text += piece
                if sampling.logprobs is not None:
                    lps.append(logprob_of(token, i, sampling.logprobs))
                finish = ("stop" if stopped else "length") if last else None
                if finish is None and not gen.do_remote_decode and len(ids) < self.tokens_per_output:
                    continue
                out = TokenOutput(request_id=gen.request_id, token_ids=ids, text=text, timings=timings or None,
                                  logprobs=lps if sampling.logprobs is not None else None)
                ids, text, lps, timings = [], "", [], {}
                if i == 0:
                    out.prompt_token_ids = prompt_ids
                if gen.do_remote_decode and finish is None:
                    finish = "remote_decode"
                    tid, expiry = self._pin(gen.request_id, math.ceil(len(prompt_ids) / self.block_size))
                    out.kv_transfer = KVTransferParams(
                        engine_id=self.id, kv_endpoint=self.kv_server.endpoint, transfer_id=tid,
                        block_ids=list(range(math.ceil(len(prompt_ids) / self.block_size))),
                        num_tokens=len(prompt_ids), first_token_id=token, lease_expiry=expiry,
                        first_token_logprob=out.logprobs[0] if out.logprobs else None)
                if finish is not None:
                    out.finish_reason = finish
                    out.usage = Usage(prompt_tokens=len(prompt_ids), completion_tokens=i + 1, cached_tokens=cached)
                outputs += 1
                yield out
                if finish is not None:
                    self.finished += 1
                    return
        finally:
            self._free(gen.request_id)

    def _aborted(self, gen: Generate) -> TokenOutput:
        return TokenOutput(request_id=gen.request_id, token_ids=[], text="", finish_reason="abort")

    def _release_remote(self, params: KVTransferParams) -> None:
        """After the (simulated) read, send ``ReleaseKV`` in the background, like the real connector."""
        task = asyncio.create_task(self._send_release(params))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _send_release(self, params: KVTransferParams) -> None:
        client = self._kv_clients.get(params.kv_endpoint)
        if client is None:
            client = self._kv_clients[params.kv_endpoint] = BusClient(params.kv_endpoint, name=f"{self.id}-kv-out",
                                                                      timeout=2.0)
        try:
            await client.call(ReleaseKV(transfer_ids=[params.transfer_id]))
        except BusError as e:  # prefill's lease expires instead
            log.warning("%s: ReleaseKV to %s failed: %s", self.id, params.engine_id, e)


async def run_fakes(registry: str, *, prefill: int = 1, decode: int = 1, both: int = 0, model: str = "fake",
                    **kwargs) -> list[FakeEngine]:
    """Start and register fake engines of each role."""
    engines = [FakeEngine(role, registry, model=model, **kwargs)
               for role, count in (("prefill", prefill), ("decode", decode), ("both", both)) for _ in range(count)]
    for e in engines:
        await e.start()
    return engines


class FakeCluster:
    """A real registry, fake engines and a real gateway, all in the running event loop.

    ``async with FakeCluster(prefill=2, gateway={"max_retries": 1}) as c:`` then
    ``c.url`` is the gateway's base URL and ``c.engines`` the fake engines.
    """

    def __init__(self, *, prefill: int = 1, decode: int = 1, both: int = 0, gateway: dict | None = None,
                 heartbeat_interval_s: float = 0.1, lease_ttl_s: float = 0.6, **engine_kwargs):
        self.roles = {"prefill": prefill, "decode": decode, "both": both}
        self.gateway_overrides = gateway or {}
        self.registry_config = RegistryConfig(bind="tcp://127.0.0.1:0", heartbeat_interval_s=heartbeat_interval_s,
                                              lease_ttl_s=lease_ttl_s)
        self.engine_kwargs = engine_kwargs
        self.registry: Registry | None = None
        self.engines: list[FakeEngine] = []
        self.url = ""
        self._gateway: asyncio.Task | None = None

    def of(self, role: Role) -> list[FakeEngine]:
        return [e for e in self.engines if e.role == role]

    async def start_registry(self, bind: str | None = None) -> None:
        self.registry_config.bind = bind or self.registry_config.bind
        self.registry = Registry(self.registry_config)
        await self.registry.start()
        self.registry_config.bind = self.registry.endpoint

    async def stop_registry(self) -> None:
        if self.registry is not None:
            await self.registry.close()
            self.registry = None

    async def add_engine(self, role: Role, **kwargs) -> FakeEngine:
        engine = FakeEngine(role, self.registry_config.bind, **{**self.engine_kwargs, **kwargs})
        await engine.start()
        self.engines.append(engine)
        return engine

    async def __aenter__(self) -> "FakeCluster":
        from services.gateway import GatewayConfig, serve

        await self.start_registry()
        for role, count in self.roles.items():
            for _ in range(count):
                await self.add_engine(role)  # type: ignore[arg-type]
        config = GatewayConfig(**{"port": 0, "registry": self.registry_config.bind, "log_level": "warning",
                                  **self.gateway_overrides})
        ready, started = asyncio.Event(), asyncio.get_running_loop().create_future()
        self._gateway = asyncio.create_task(serve(config, ready=ready, started=started.set_result))
        await asyncio.wait({self._gateway, asyncio.ensure_future(ready.wait())}, timeout=10,
                           return_when=asyncio.FIRST_COMPLETED)
        if self._gateway.done():
            self._gateway.result()
        server = await started
        self.url = f"http://127.0.0.1:{server.port}"
        return self

    async def __aexit__(self, *exc) -> None:
        if self._gateway is not None:
            self._gateway.cancel()
            await asyncio.gather(self._gateway, return_exceptions=True)
        for e in self.engines:
            await e.stop()
        await self.stop_registry()


async def _main(args: argparse.Namespace) -> None:
    engines = await run_fakes(args.registry, prefill=args.prefill, decode=args.decode, both=args.both,
                              model=args.model, tokens_per_output=args.tokens_per_output)
    tune_gc(20_000)  # as the gateway does: instant fakes must not pause for collections
    try:
        await asyncio.Event().wait()
    finally:
        for e in engines:
            await e.stop()


if __name__ == "__main__":
    from common.service import run_service, setup_logging

    parser = argparse.ArgumentParser(description="Run instant fake engines registered with a registry.")
    parser.add_argument("--registry", required=True)
    parser.add_argument("--prefill", type=int, default=1)
    parser.add_argument("--decode", type=int, default=1)
    parser.add_argument("--both", type=int, default=0)
    parser.add_argument("--model", default="fake")
    parser.add_argument("--tokens-per-output", type=int, default=1, help="decode tokens batched per TokenOutput")
    setup_logging("warning")
    raise SystemExit(run_service(_main(parser.parse_args())))
