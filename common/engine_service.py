"""The engine service that ``pdserve prefill`` and ``pdserve decode`` run.

One process = one ``AsyncEngine`` + a request ROUTER (``Generate``, ``Abort``,
``GetStats``) + a KV side channel ROUTER (``Handshake``, ``RenewLease``,
``ReleaseKV``) + a registration with heartbeats.  The role decides the flow:

* ``prefill``: ``Generate(do_remote_decode)`` runs the prompt, replies with the
  first token and ``KVTransferParams``; the prompt's blocks stay pinned under a
  lease until decode sends ``ReleaseKV``, the gateway sends ``Abort``, or the
  lease expires.
* ``decode``: ``Generate(remote_prefill=params)`` allocates blocks, reads the
  missing ones from the prefill engine through the ``KVConnector`` while the
  request waits in ``WAITING_FOR_REMOTE_KVS``, then streams tokens 2...
* ``both``: plain colocated serving — the baseline every comparison uses.

Shutdown (SIGTERM/SIGINT) is ordered: deregister and stop accepting, let
in-flight requests finish within ``--shutdown-timeout-s``, abort the rest,
release leases, close sockets, unregister transfer memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import AsyncIterator, Literal

from common.bus import DEFAULT_MAX_FRAME_BYTES, BusServer
from common.config import opt, require
from common.engine.async_engine import AsyncEngine
from common.engine.config import EngineConfig
from common.engine.engine import LLMEngine
from common.engine.kv_cache import KVCache
from common.engine.sequence import InvalidRequest, RequestOutput
from common.errors import KVTransferError, PeerError
from common.kv_transfer.backend import TransferBackend, make_backend
from common.kv_transfer.config import KVTransferConfig
from common.kv_transfer.connector import KVConnector, KVSideChannel
from common.kv_transfer.leases import LeaseTable
from common.kv_transfer.ranges import KVLayout
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
    TokenOutput,
)
from common.registry_client import RegistryClient

log = logging.getLogger(__name__)


@dataclass
class EngineServiceConfig(EngineConfig, KVTransferConfig):
    role: Literal["prefill", "decode", "both"] = opt("both", "prefill, decode, or both (colocated, no transfer)")
    bind: str = opt("tcp://127.0.0.1:0", "request ROUTER address (port 0: any free port)")
    kv_bind: str = opt("tcp://127.0.0.1:0", "KV side-channel ROUTER address (port 0: any free port)")
    advertise_host: str = opt("127.0.0.1", "host the registry hands out for this engine's sockets")
    registry: str = opt("tcp://127.0.0.1:7100", "registry endpoint")
    instance_id: str | None = opt(None, "unique instance id; none = <role>-<hostname>-<pid>")
    served_model_name: str | None = opt(None, "model name clients use; none = --model")
    registry_timeout_s: float = opt(5.0, "timeout of registry calls")
    remote_blocks_timeout_s: float = opt(30.0, "decode: wait this long for free blocks for a remote prefill")
    shutdown_timeout_s: float = opt(10.0, "on SIGTERM, let in-flight requests finish this long, then abort them")
    max_frame_bytes: int = opt(DEFAULT_MAX_FRAME_BYTES, "largest accepted message in bytes")
    log_level: str = opt("info", "log level")

    def validate(self) -> None:
        EngineConfig.validate(self)
        KVTransferConfig.validate(self)
        for name in ("bind", "kv_bind", "registry"):
            require(getattr(self, name).startswith(("tcp://", "ipc://")), name, "must be a tcp:// or ipc:// address")
        for name in ("registry_timeout_s", "remote_blocks_timeout_s", "shutdown_timeout_s"):
            require(getattr(self, name) > 0, name, "must be > 0")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model


@dataclass
class PrefillConfig(EngineServiceConfig):
    role: Literal["prefill", "decode", "both"] = opt("prefill", "prefill, or both (colocated, no transfer)")


@dataclass
class DecodeConfig(EngineServiceConfig):
    role: Literal["prefill", "decode", "both"] = opt("decode", "decode, or both (colocated, no transfer)")


def _endpoint(bound: str, host: str) -> str:
    """``tcp://0.0.0.0:7200`` bound -> ``tcp://<host>:7200`` advertised."""
    if not bound.startswith("tcp://"):
        return bound
    return f"tcp://{host}:{bound.rsplit(':', 1)[1]}"


class EngineService:
    """One engine instance on the bus; ``start()`` then ``shutdown()``."""

    def __init__(self, config: EngineServiceConfig, engine: LLMEngine):
        self.config = config
        self.role = config.role
        self.instance_id = config.instance_id or f"{config.role}-{socket.gethostname()}-{os.getpid()}"
        self.llm = engine
        self.engine = AsyncEngine(engine)
        kv = engine.kv_cache
        mc = engine.model_config
        self.fingerprint = Fingerprint(
            model=config.model_name, dtype=engine.dtype_name, block_size=engine.block_size,
            num_layers=mc.num_layers, num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim,
            kv_layout=KVCache.LAYOUT, transfer_backend=config.kv_backend,
        )  # fmt: skip
        self.layout = KVLayout.of(kv)
        self.server = BusServer(config.bind, EngineRequest, name=f"{self.instance_id}",
                                max_frame_bytes=config.max_frame_bytes)
        self.server.on(Generate, self.on_generate)
        self.server.on(Abort, self.on_abort)
        self.server.on(GetStats, self.on_stats)
        self.kv_server = BusServer(config.kv_bind, KVRequest, name=f"{self.instance_id}-kv",
                                   max_frame_bytes=config.max_frame_bytes)
        self.backend: TransferBackend | None = None
        self.connector: KVConnector | None = None
        self.leases = LeaseTable(config.kv_lease_seconds, self._release_pinned)
        self.transfer_of: dict[str, str] = {}  # request id -> transfer id pinned for it (prefill)
        self.registry = RegistryClient(config.registry, timeout=config.registry_timeout_s)
        self.accepting = False
        self.num_finished = 0
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.role != "both":
            # All KV memory is registered before any peer can learn our address.
            self.backend = make_backend(self.config.kv_backend, self.config.kv_host, force_tcp=self.config.kv_force_tcp,
                                        device_id=self.llm.device.index if self.llm.device.type == "cuda" else -1)
            self.backend.register([self.layout.region])
        if self.role == "prefill":
            KVSideChannel(self.instance_id, self.fingerprint, self.backend, self.layout, self.leases).attach(self.kv_server)
            self._tasks.append(asyncio.create_task(self.leases.run_sweeper(self.config.kv_lease_sweep_interval_s)))
        if self.role == "decode":
            self.connector = KVConnector(self.backend, self.instance_id, self.fingerprint, self.layout, self.config)
        await self.kv_server.start()
        await self.server.start()
        self.accepting = True
        await self.registry.start_heartbeats(self.instance(), self.load)
        log.info("%s serving %s on %s (KV side channel %s)", self.instance_id, self.config.model_name,
                 self.request_endpoint, self.kv_endpoint)

    async def shutdown(self) -> None:
        """Ordered: deregister, stop accepting, drain or abort, release, close, unregister memory."""
        self.accepting = False
        await self._quietly(self.registry.stop(), "deregistering")
        deadline = time.monotonic() + self.config.shutdown_timeout_s
        while self.server.num_active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.server.close()  # cancels what is left: each cancel aborts its engine request
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for transfer_id in list(self.transfer_of.values()):
            self.leases.release(transfer_id)
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.kv_server.close()
        if self.connector is not None:
            await self._quietly(self.connector.close(), "closing the KV connector")
        await self.engine.shutdown(timeout=self.config.shutdown_timeout_s)
        if self.backend is not None:
            self.backend.close()
        await self.registry.close()
        log.info("%s stopped", self.instance_id)

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
            id=self.instance_id, role=self.role, request_endpoint=self.request_endpoint,
            kv_endpoint=self.kv_endpoint, model=self.config.model_name, fingerprint=self.fingerprint,
            capacity=Capacity(self.config.max_num_seqs, self.llm.kv_cache.num_blocks, self.llm.max_model_len),
        )  # fmt: skip

    async def load(self) -> Load:
        return (await self.engine.stats()).to_load()

    def _in_background(self, coro) -> None:
        """Run an engine command we must not wait for (from callbacks and ``finally`` blocks)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ handlers

    async def on_stats(self, msg: GetStats) -> EngineStats:
        return EngineStats(self.instance_id, self.role, await self.load(), self.num_finished, len(self.leases))

    async def on_abort(self, msg: Abort) -> Ack:
        """Abort the request wherever it is; on prefill also release its pinned transfer."""
        await self.engine.abort(msg.request_id)
        transfer_id = self.transfer_of.get(msg.request_id)
        if transfer_id is not None:
            self.leases.release(transfer_id)
        return Ack()

    async def on_generate(self, msg: Generate) -> AsyncIterator[TokenOutput]:
        if not self.accepting:
            raise PeerError("shutting_down", f"{self.instance_id} is shutting down")
        if msg.do_remote_decode and self.role != "prefill":
            raise PeerError("invalid_request", f"{self.instance_id} has role {self.role}, not prefill", "do_remote_decode")
        if msg.remote_prefill is not None and self.role != "decode":
            raise PeerError("invalid_request", f"{self.instance_id} has role {self.role}, not decode", "remote_prefill")
        prompt_ids = self._prompt_token_ids(msg)
        if msg.remote_prefill is not None:
            outputs = self._decode_leg(msg, prompt_ids, msg.remote_prefill)
        else:
            outputs = self._local(msg, prompt_ids)
        first = True
        async for out in outputs:
            token = self._to_message(msg.request_id, out)
            if first:
                token.prompt_token_ids = prompt_ids
                first = False
            if out.finish_reason == "remote_decode":
                token.kv_transfer = self._pin(msg.request_id, prompt_ids, out)
            if out.finished:
                self.num_finished += 1
            yield token

    # ------------------------------------------------------------------ flows

    def _prompt_token_ids(self, msg: Generate) -> list[int]:
        given = [x is not None for x in (msg.prompt, msg.prompt_token_ids, msg.messages)]
        if sum(given) != 1:
            raise PeerError("invalid_request", "give exactly one of prompt, prompt_token_ids, messages", "prompt")
        tok = self.llm.tokenizer
        if msg.prompt_token_ids is not None:
            return list(msg.prompt_token_ids)
        if msg.prompt is not None:
            return tok.encode(msg.prompt)
        try:
            text = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in msg.messages])
        except ValueError as e:
            raise PeerError("invalid_request", str(e), "messages") from e
        return tok.encode(text, add_special_tokens=False)

    async def _local(self, msg: Generate, prompt_ids: list[int]) -> AsyncIterator[RequestOutput]:
        """Colocated or prefill leg: the engine computes the prompt itself."""
        transfer_id = self._transfer_id(msg.request_id) if msg.do_remote_decode else None
        finished = False
        try:
            async for out in self.engine.generate(msg.request_id, prompt_ids, msg.sampling,
                                                  pin_for_transfer=transfer_id):
                finished = out.finished
                yield out
        except InvalidRequest as e:
            raise PeerError("invalid_request", e.message, e.param) from e
        finally:
            if transfer_id is not None and not finished:
                # Cancelled around the finish: the engine may have pinned blocks no lease knows.
                self._in_background(self.engine.release_transfer(transfer_id))

    async def _decode_leg(self, msg: Generate, prompt_ids: list[int], params: KVTransferParams
                          ) -> AsyncIterator[RequestOutput]:
        """Allocate blocks, read the prompt's KV from prefill, then decode tokens 2..."""
        assert self.connector is not None
        if params.num_tokens != len(prompt_ids):
            raise PeerError("invalid_request", f"KV for {params.num_tokens} tokens, prompt has {len(prompt_ids)}",
                            "remote_prefill")
        request_id = msg.request_id
        try:
            allocation = await asyncio.wait_for(
                self.engine.add_remote_request(request_id, prompt_ids, params.first_token_id, msg.sampling,
                                               num_remote_tokens=params.num_tokens),
                self.config.remote_blocks_timeout_s)
        except BaseException as e:
            self.connector.release(params)  # prefill must not keep blocks nobody will read
            if isinstance(e, InvalidRequest):
                raise PeerError("invalid_request", e.message, e.param) from e
            if isinstance(e, asyncio.TimeoutError):
                raise PeerError("overloaded", f"no free KV blocks within {self.config.remote_blocks_timeout_s:g} s"
                                ) from None
            raise
        finished = False
        try:
            started = time.monotonic()
            try:
                stats = await self.connector.read_blocks(params, allocation.block_ids, allocation.num_cached_blocks)
                timings = {"kv_transfer_s": time.monotonic() - started, "kv_bytes": float(stats.bytes),
                           "kv_ranges": float(stats.num_ranges)}
                ok = True
            except KVTransferError as e:
                log.warning("request %s: reading KV from %s failed: %s", request_id, params.engine_id, e)
                timings = {"kv_transfer_s": time.monotonic() - started, "kv_bytes": 0.0, "kv_failed": 1.0}
                ok = False
            await self.engine.finish_remote_kv(request_id, ok)
            kv_done = time.monotonic()
            first = True
            async for out in self.engine.stream(request_id):
                finished = out.finished
                if first:
                    timings["first_decode_step_s"] = time.monotonic() - kv_done
                    out.timings = {**(out.timings or {}), **timings}
                    first = False
                if out.finish_reason == "error":
                    raise PeerError("kv_transfer_failed", out.error or "reading the prompt's KV failed")
                yield out
        finally:
            if not finished:  # cancelled or failed before the engine's stream took over
                self._in_background(self.engine.abort(request_id))

    def _transfer_id(self, request_id: str) -> str:
        return f"{self.instance_id}/{request_id}"

    def _pin(self, request_id: str, prompt_ids: list[int], out: RequestOutput) -> KVTransferParams:
        transfer_id = self._transfer_id(request_id)
        expiry = self.leases.pin(transfer_id, out.pinned_block_ids or [])
        self.transfer_of[request_id] = transfer_id
        return KVTransferParams(
            engine_id=self.instance_id, kv_endpoint=self.kv_endpoint, transfer_id=transfer_id,
            block_ids=list(out.pinned_block_ids or []), num_tokens=len(prompt_ids),
            first_token_id=out.new_token_ids[0], lease_expiry=expiry,
            first_token_logprob=out.logprobs[0] if out.logprobs else None,
        )  # fmt: skip

    def _release_pinned(self, transfer_id: str) -> None:
        """LeaseTable callback (release, abort or expiry): give the blocks back, exactly once."""
        self._in_background(self.engine.release_transfer(transfer_id))
        for request_id, pinned in list(self.transfer_of.items()):
            if pinned == transfer_id:
                del self.transfer_of[request_id]

    @staticmethod
    def _to_message(request_id: str, out: RequestOutput) -> TokenOutput:
        return TokenOutput(
            request_id=request_id, token_ids=out.new_token_ids, text=out.text, logprobs=out.logprobs,
            finish_reason=out.finish_reason, usage=out.usage, timings=out.timings,
        )  # fmt: skip


async def serve(config: EngineServiceConfig, *, ready: asyncio.Event | None = None) -> None:
    """Load the engine (off the event loop), serve until cancelled, then shut down in order."""
    engine = await asyncio.get_running_loop().run_in_executor(None, LLMEngine, config)
    service = EngineService(config, engine)
    try:
        await service.start()
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        await asyncio.shield(service.shutdown())
