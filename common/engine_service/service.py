"""The engine service every engine process runs (``pdserve prefill`` / ``pdserve decode``).

One process = one ``AsyncEngine`` + a request ROUTER (``Generate``, ``Abort``,
``GetStats``, ``Tokenize``, ``Detokenize``) + a KV side-channel ROUTER + a registration with heartbeats.
What a role adds is a small role object the service delegates to (``EngineRole``):

* ``both`` (``ColocatedRole``): plain colocated serving, the baseline every comparison uses;
* ``prefill`` (``services.prefill.PrefillRole``): computes the prompt, pins its
  KV for a decode engine, answers the side channel;
* ``decode`` (``services.decode.DecodeHandoff``): reads the prompt's KV from a
  prefill engine, then streams tokens 2...

Shutdown (SIGTERM/SIGINT) is ordered: deregister and stop accepting, let
in-flight requests finish and decode engines read what we pinned within
``--shutdown-timeout-s``, abort the rest (their streams end with finish reason
``abort``), let the role release what it holds (leases), close sockets,
stop the engine, unregister transfer memory.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from functools import partial
from typing import Protocol

import msgspec

from common.bus import BusServer
from common.bus.curve import ENGINE_ADMITS, KV_ADMITS, Peer
from common.bus.server import require_sender, sender
from common.client_pool import ClientPool
from common.engine.async_engine import AsyncEngine
from common.engine.engine import LLMEngine, resolve_device
from common.engine.kv_cache import KVCache, zeros
from common.engine.sequence import InvalidRequest, KVPush, RequestOutput
from common.engine_service.addresses import WILDCARDS, advertised_problem, tcp_host
from common.engine_service.config import EngineServiceConfig
from common.engine_service.prompt import prompt_token_ids
from common.engine_service.stats_log import StatsLog
from common.errors import PeerError
from common.kv_transfer.config import KVTransferConfig
from common.kv_transfer.rank_agent import RankAgentInfo
from common.kv_transfer.rank_io import LocalRankIO, RankIO, RemoteRankIO
from common.kv_transfer.ranges import KVLayout
from common.kv_transfer.transport_set import TransportSet, shared_kv_file
from common.messages import (
    Abort,
    Ack,
    Capacity,
    Detokenize,
    Detokenized,
    EngineRequest,
    EngineStats,
    Fingerprint,
    Generate,
    GetStats,
    Instance,
    KVRequest,
    Load,
    SamplingParams,
    Tokenize,
    TokenOutput,
    Tokenized,
)
from common.discovery import registration_for

log = logging.getLogger(__name__)

ENGINE_WATCH_INTERVAL_S = 0.5  # how often serve() checks that the engine thread is alive
SHUTDOWN_ABORT_GRACE_S = 1.0  # after aborting what is left, how long its streams get to send their last output


class EngineRole(Protocol):
    """What one role adds to the shared service."""

    serves_prefill_leg: bool  # accepts Generate(do_remote_decode)
    serves_decode_leg: bool  # accepts Generate(remote_prefill=...)

    async def start(self) -> None:
        """Before the sockets open: register transfer memory, attach side-channel handlers, start tasks."""

    def generate(self, msg: Generate) -> AsyncIterator[TokenOutput]:
        """The request's outputs (``PeerError`` for a refused request)."""

    async def abort(self, request_id: str, peer: Peer) -> None:
        """``Abort`` from ``peer``: stop the request wherever it is and drop what the role holds for it,
        if ``peer`` sent its ``Generate``; otherwise nothing (as for an unknown id)."""

    def num_transfers(self) -> int:
        """KV transfers in progress (pinned for a reader, or being read): shutdown waits for them."""

    async def shutdown(self) -> None:
        """After the request ROUTER closed: release what the role still holds."""


RoleFactory = type[EngineRole]  # a role class, built with the service: ``role_class(service)``


def _endpoint(bound: str, host: str) -> str:
    """``tcp://0.0.0.0:7200`` bound -> ``tcp://<host>:7200`` advertised."""
    if not bound.startswith("tcp://"):
        return bound
    return f"tcp://{host}:{bound.rsplit(':', 1)[1]}"


class EngineService:
    """One engine instance on the bus; ``start()`` then ``shutdown()``.

    ``core`` is the synchronous ``LLMEngine``; ``engine`` the ``AsyncEngine`` stepping it on its thread.
    """

    def __init__(self, config: EngineServiceConfig, core: LLMEngine, make_role: RoleFactory):
        self.config = config
        self.instance_id = config.instance_id or f"{config.role}-{socket.gethostname()}-{os.getpid()}"
        self.core = core
        self.engine = AsyncEngine(core, config.progress_interval_s, config.slow_step_log_s)
        mc = core.model_config
        self.fingerprint = Fingerprint(
            model=config.model_name, dtype=core.dtype_name, block_size=core.block_size,
            num_layers=mc.num_layers, num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim,
            kv_layout=KVCache.LAYOUT, transfer_backend=config.kv_backend,
            tensor_parallel_size=config.tensor_parallel_size,
        )  # fmt: skip
        self.layout = KVLayout.of(core.kv_cache)
        self.server = BusServer(config.bind, EngineRequest, name=self.instance_id,
                                max_frame_bytes=config.max_frame_bytes, admits=ENGINE_ADMITS)
        self.server.on(Generate, self.on_generate)
        self.server.on(Abort, self.on_abort)
        self.server.on(GetStats, self.on_stats)
        self.server.on(Tokenize, self.on_tokenize)
        self.server.on(Detokenize, self.on_detokenize)
        self.kv_server = BusServer(config.kv_bind, KVRequest, name=f"{self.instance_id}-kv",
                                   max_frame_bytes=config.max_frame_bytes, admits=KV_ADMITS)
        self.transports: TransportSet | None = None  # rank 0's
        self.kv_ranks: list[RankIO] = []  # every rank's KV, in rank order, rank 0's a LocalRankIO (roles moving KV)
        self.rank_clients = ClientPool(name=f"{self.instance_id}-ranks", timeout=config.kv_rpc_timeout_s)
        self.active: dict[str, Peer] = {}  # request id with a running Generate handler -> the peer that sent it
        self.registry = registration_for(config.registry, timeout=config.registry_timeout_s)
        self.accepting = False
        self.stopped = False
        self.num_finished = 0
        self.role = make_role(self)
        moves_kv = self.role.serves_prefill_leg or self.role.serves_decode_leg
        self.stats_log = StatsLog(self.instance_id, lambda: self.engine.latest_stats,
                                  self.role.num_transfers if moves_kv else None, config.stats_interval_s)

    # ------------------------------------------------------------------ lifecycle

    def open_kv_ranks(self) -> list[RankIO]:
        """Every rank's KV as transfers see it, rank 0's memory registered with its transports here (roles
        that move KV call this from ``start``, so the memory is registered before any peer can learn our
        address; the other ranks registered theirs before the engine finished loading)."""
        heads = self.core.tp.kv_heads(self.core.model_config.num_kv_heads)
        own = LocalRankIO.open(self.config, 0, heads, self.core.kv_cache.data, self.layout, self.core.tp.world_size)
        self.transports = own.transports
        workers = [msgspec.msgpack.decode(info, type=RankAgentInfo) for info in self.core.worker_kv]
        self.kv_ranks = [own, *(RemoteRankIO(w.memory, w.endpoint, self.rank_clients, self.config) for w in workers)]
        return self.kv_ranks

    async def start(self) -> None:
        await self.role.start()
        await self.kv_server.start()
        await self.server.start()
        self.accepting = True
        if tcp_host(self.config.bind) in WILDCARDS:
            problem = await asyncio.to_thread(advertised_problem, self.request_endpoint)  # before registering
            wrong = "" if problem is None else f", and connecting to it from here fails ({problem}): peers told to " \
                                               "connect there will not reach this engine"
            log.log(logging.WARNING if wrong else logging.INFO, "%s listens on all interfaces (%s): --advertise-host "
                    "%s is not an address of this host%s", self.instance_id, self.server.endpoint,
                    self.config.advertise_host, wrong)
        await self.registry.start_heartbeats(self.instance(), self.load)
        self.stats_log.start()
        log.info("%s serving %s on %s (KV side channel %s)", self.instance_id, self.config.model_name,
                 self.request_endpoint, self.kv_endpoint)

    async def shutdown(self) -> None:
        """Ordered: deregister, stop accepting, drain or abort, release, close, unregister memory."""
        if self.stopped:
            return
        self.stopped = True
        self.accepting = False
        await self.stats_log.stop()
        await self._quietly(self.registry.stop(), "deregistering")
        # In-flight requests finish and decode engines read what we pinned, within the timeout...
        await self._wait_until(lambda: not (self.server.num_active or self.role.num_transfers()),
                               self.config.shutdown_timeout_s)
        # ...then the rest are aborted: their streams end with finish reason "abort"...
        for request_id, peer in list(self.active.items()):
            await self._quietly(self.role.abort(request_id, peer), f"aborting {request_id}")
        await self._wait_until(lambda: not self.server.num_active, SHUTDOWN_ABORT_GRACE_S)
        await self.server.close()  # ...and what still runs is cancelled (each cancel aborts its engine request)
        await self._quietly(self.role.shutdown(), "releasing the role's transfers")
        await self.kv_server.close()
        await self.engine.shutdown(timeout=self.config.shutdown_timeout_s)
        await self.rank_clients.close()
        if self.kv_ranks:  # rank 0's reads and transports (the workers' stop with their processes)
            self.kv_ranks[0].close()
        await self.registry.close()
        log.info("%s stopped", self.instance_id)

    @staticmethod
    async def _wait_until(done: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not done() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    @staticmethod
    async def _quietly(coro, what: str) -> None:
        try:
            await coro
        except Exception as e:  # shutdown goes on whatever one step says
            log.warning("shutdown: %s failed: %s", what, e)

    @property
    def request_endpoint(self) -> str:
        return _endpoint(self.server.endpoint, self.config.advertise_host)

    @property
    def kv_endpoint(self) -> str:
        return _endpoint(self.kv_server.endpoint, self.config.advertise_host)

    def instance(self) -> Instance:
        return Instance(
            id=self.instance_id, role=self.config.role, request_endpoint=self.request_endpoint,
            kv_endpoint=self.kv_endpoint, model=self.config.model_name, fingerprint=self.fingerprint,
            capacity=Capacity(self.config.max_num_seqs, self.core.kv_cache.num_blocks, self.core.max_model_len),
            kv_mode=self.config.kv_mode,
        )  # fmt: skip

    def load(self) -> Load:
        """The engine's load as of its last step: never waits for a step in progress, so a long
        prefill cannot delay heartbeats past the registry's lease."""
        return self.engine.latest_stats.to_load()

    # ------------------------------------------------------------------ handlers

    async def on_stats(self, msg: GetStats) -> EngineStats:
        return EngineStats(self.instance_id, self.config.role, self.load(), self.num_finished,
                           self.role.num_transfers(), dict(self.transports.chosen) if self.transports else {},
                           self.engine.latest_stats.num_preemptions)

    async def on_tokenize(self, msg: Tokenize) -> Tokenized:
        tokenizer = self.core.tokenizer
        if (msg.prompt is None) == (msg.messages is None):
            raise PeerError("invalid_request", "give exactly one of prompt, messages", "prompt")
        text = msg.prompt
        if msg.messages is not None:
            try:
                text = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in msg.messages],
                                                     add_generation_prompt=msg.add_generation_prompt)
            except ValueError as e:
                raise PeerError("invalid_request", str(e), "messages") from e
        ids = tokenizer.encode(text, add_special_tokens=msg.add_special_tokens)
        strs = tokenizer.convert_ids_to_tokens(ids) if msg.return_token_strs else None
        return Tokenized(ids, self.core.max_model_len, strs)

    async def on_detokenize(self, msg: Detokenize) -> Detokenized:
        tokenizer = self.core.tokenizer
        if not all(0 <= t < tokenizer.vocab_size for t in msg.token_ids):
            raise PeerError("invalid_request", f"token ids must be in 0..{tokenizer.vocab_size - 1}", "tokens")
        return Detokenized(tokenizer.decode(msg.token_ids, skip_special_tokens=False))

    async def on_abort(self, msg: Abort) -> Ack:
        """Only the peer that sent a request may abort it; any other gets what an unknown id gets."""
        await self.role.abort(msg.request_id, sender())
        return Ack()

    async def on_generate(self, msg: Generate) -> AsyncIterator[TokenOutput]:
        require_sender("gateway", "send Generate")
        if not self.accepting:
            raise PeerError("shutting_down", f"{self.instance_id} is shutting down")
        if msg.do_remote_decode and not self.role.serves_prefill_leg:
            raise PeerError("invalid_request", f"{self.instance_id} has role {self.config.role}, not prefill",
                            "do_remote_decode")
        if msg.remote_prefill is not None and not self.role.serves_decode_leg:
            raise PeerError("invalid_request", f"{self.instance_id} has role {self.config.role}, not decode",
                            "remote_prefill")
        if (msg.await_push or msg.push_to is not None) and self.config.kv_mode != "push":
            raise PeerError("invalid_request", f"{self.instance_id} moves KV in {self.config.kv_mode} mode, not push",
                            "push_to" if msg.push_to is not None else "await_push")
        if msg.await_push and not self.role.serves_decode_leg:
            raise PeerError("invalid_request", f"{self.instance_id} has role {self.config.role}, not decode",
                            "await_push")
        if msg.request_id in self.active:
            raise PeerError("invalid_request", f"request {msg.request_id!r} is already running here", "request_id")
        if self.engine.failed is not None:
            raise PeerError("shutting_down", f"{self.instance_id}'s engine failed: {self.engine.failed!r}")
        self.active[msg.request_id] = sender()
        try:
            async for token in self.role.generate(msg):
                if token.finish_reason is not None:
                    self.num_finished += 1
                yield token
        finally:
            self.active.pop(msg.request_id, None)

    # ------------------------------------------------------------------ what roles share

    def prompt_token_ids(self, msg: Generate) -> list[int]:
        """The request's prompt as token ids (``prompt.prompt_token_ids`` with the model's tokenizer)."""
        return prompt_token_ids(self.core.tokenizer, msg)

    def serve_locally(self, msg: Generate) -> AsyncIterator[TokenOutput]:
        """A whole request computed here (no KV transfer)."""
        prompt_ids = self.prompt_token_ids(msg)
        return self.tokens(msg.request_id, prompt_ids, self.local_outputs(msg.request_id, prompt_ids, msg.sampling))

    async def local_outputs(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                            pin_for_transfer: str | None = None, push: KVPush | None = None
                            ) -> AsyncIterator[RequestOutput]:
        """The engine computes the prompt itself (colocated, or a prefill leg pinning under
        ``pin_for_transfer``, pushing its KV to ``push`` in push mode); engine refusals and failures become
        ``PeerError``."""
        first = True
        try:
            async for out in self.engine.generate(request_id, prompt_ids, sampling, pin_for_transfer=pin_for_transfer,
                                                  push=push):
                if first:
                    self.stats_log.count_prompt(len(prompt_ids))
                    first = False
                if out.finish_reason == "error":
                    raise PeerError("internal", out.error or "the request failed in the engine")
                yield out
        except InvalidRequest as e:
            raise PeerError("invalid_request", e.message, e.param) from e

    async def tokens(self, request_id: str, prompt_ids: list[int], outputs: AsyncIterator[RequestOutput],
                     on_final: Callable[[RequestOutput, TokenOutput], None] | None = None
                     ) -> AsyncIterator[TokenOutput]:
        """Engine outputs as wire messages; the first carries the prompt's token ids, and
        ``on_final`` may complete the final one (the prefill leg adds its ``kv_transfer``)."""
        first = True
        async for out in outputs:
            self.stats_log.count_generated(len(out.new_token_ids))
            token = self._to_message(request_id, out)
            if first:
                token.prompt_token_ids = prompt_ids
                first = False
            if out.finished and on_final is not None:
                on_final(out, token)
            yield token

    def _to_message(self, request_id: str, out: RequestOutput) -> TokenOutput:
        for lp in out.logprobs or ():
            lp.token = self._token_text(lp.token_id)
            lp.top_tokens = [self._token_text(t) for t, _ in lp.top]
        return TokenOutput(
            request_id=request_id, token_ids=out.new_token_ids, text=out.text, logprobs=out.logprobs,
            finish_reason=out.finish_reason, usage=out.usage, timings=out.timings,
        )  # fmt: skip

    def _token_text(self, token_id: int) -> str:
        """A token's text alone, as OpenAI's logprobs show it (partial UTF-8 shows as U+FFFD)."""
        return self.core.tokenizer.decode([token_id], skip_special_tokens=False)


async def serve(config: EngineServiceConfig, roles: Mapping[str, RoleFactory]) -> None:
    """Load the engine (off the event loop), serve ``roles[config.role]`` until cancelled, then shut
    down in order."""
    role = roles[config.role]
    moves_kv = role.serves_prefill_leg or role.serves_decode_leg
    kv_file = shared_kv_file(config, resolve_device(config.device)) if moves_kv else None
    kv_transfer = {name: getattr(config, name) for name in KVTransferConfig.__dataclass_fields__} if moves_kv else None
    try:
        core = await asyncio.get_running_loop().run_in_executor(
            None, partial(LLMEngine, config, kv_allocate=kv_file.allocate if kv_file else zeros,
                          kv_transfer=kv_transfer))
        service = EngineService(config, core, role)
        try:
            await service.start()
            # What exists now (model, KV cache, service) lives as long as the process: the collector's passes
            # skip it from here on (vLLM does the same); a gen-0 pass mid-decode took 1.9 ms before, 0.3 after.
            gc.collect()
            gc.freeze()
            while service.engine.failed is None:
                await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)
            # A dead engine thread serves nothing: exit non-zero so a supervisor restarts us.
            raise RuntimeError(f"{service.instance_id}: engine failed: {service.engine.failed!r}")
        finally:
            await asyncio.shield(service.shutdown())
    finally:
        if kv_file is not None:
            kv_file.close()
