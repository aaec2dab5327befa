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
in-flight requests finish and decode engines read what we pinned within
``--shutdown-timeout-s``, abort the rest (their streams end with finish reason
``abort``), release leases, close sockets, unregister transfer memory.

An ``Abort`` for a decode request whose KV is being read takes effect when the
read stops writing into its blocks, never before (the blocks could be reused).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import typing
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Literal

from common.bus import DEFAULT_MAX_FRAME_BYTES, BusServer
from common.config import opt, require
from common.engine.async_engine import AsyncEngine, RequestAborted
from common.engine.config import EngineConfig
from common.engine.engine import LLMEngine
from common.engine.kv_cache import KVCache
from common.engine.sequence import InvalidRequest, RemoteAllocation, RequestOutput
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

ENGINE_WATCH_INTERVAL_S = 0.5  # how often serve() checks that the engine thread is alive
SHUTDOWN_ABORT_GRACE_S = 1.0  # after aborting what is left, how long its streams get to send their last output


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
        roles = typing.get_args(typing.get_type_hints(type(self))["role"])
        require(self.role in roles, "role", f"must be one of {', '.join(roles)}")
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
    role: Literal["prefill", "both"] = opt("prefill", "prefill, or both (colocated, no transfer)")


@dataclass
class DecodeConfig(EngineServiceConfig):
    role: Literal["decode", "both"] = opt("decode", "decode, or both (colocated, no transfer)")


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
        self.active: set[str] = set()  # request ids with a running Generate handler
        self.reading: set[str] = set()  # decode: request ids whose blocks a backend read may be writing
        self.aborted: set[str] = set()  # active request ids an Abort arrived for
        self.registry = RegistryClient(config.registry, timeout=config.registry_timeout_s)
        self.accepting = False
        self.stopped = False
        self.num_finished = 0
        self._tasks: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.role != "both":
            # All KV memory is registered before any peer can learn our address.
            device_id = (self.llm.device.index or 0) if self.llm.device.type == "cuda" else -1
            self.backend = make_backend(self.config.kv_backend, self.config.kv_host, force_tcp=self.config.kv_force_tcp,
                                        device_id=device_id, read_timeout_s=self.config.kv_read_timeout_s)
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
        if self.stopped:
            return
        self.stopped = True
        self.accepting = False
        await self._quietly(self.registry.stop(), "deregistering")
        # In-flight requests finish and decode engines read what we pinned, within the timeout...
        await self._wait_until(lambda: not (self.server.num_active or len(self.leases)), self.config.shutdown_timeout_s)
        # ...then the rest are aborted: their streams end with finish reason "abort"...
        for request_id in list(self.active):
            await self._quietly(self.on_abort(Abort(request_id)), f"aborting {request_id}")
        await self._wait_until(lambda: not self.server.num_active, SHUTDOWN_ABORT_GRACE_S)
        await self.server.close()  # ...and what still runs is cancelled (each cancel aborts its engine request)
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
            id=self.instance_id, role=self.role, request_endpoint=self.request_endpoint,
            kv_endpoint=self.kv_endpoint, model=self.config.model_name, fingerprint=self.fingerprint,
            capacity=Capacity(self.config.max_num_seqs, self.llm.kv_cache.num_blocks, self.llm.max_model_len),
        )  # fmt: skip

    def load(self) -> Load:
        """The engine's load as of its last step: never waits for a step in progress, so a long
        prefill cannot delay heartbeats past the registry's lease."""
        return self.engine.latest_stats.to_load()

    def _in_background(self, coro) -> None:
        """Run an engine command we must not wait for (from callbacks and ``finally`` blocks)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ handlers

    async def on_stats(self, msg: GetStats) -> EngineStats:
        return EngineStats(self.instance_id, self.role, self.load(), self.num_finished,
                           len(self.leases) + len(self.reading))

    async def on_abort(self, msg: Abort) -> Ack:
        """Abort the request wherever it is; on prefill also release its pinned transfer.

        A decode request whose KV is being read is aborted once the read stops writing its blocks.
        """
        if msg.request_id in self.active:
            self.aborted.add(msg.request_id)
        if msg.request_id not in self.reading:
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
        if msg.request_id in self.active or self._transfer_id(msg.request_id) in self.leases:
            raise PeerError("invalid_request", f"request {msg.request_id!r} is already running here", "request_id")
        if self.engine.failed is not None:
            raise PeerError("shutting_down", f"{self.instance_id}'s engine failed: {self.engine.failed!r}")
        self.active.add(msg.request_id)
        try:
            if msg.remote_prefill is not None:
                try:
                    prompt_ids = self._prompt_token_ids(msg)
                except PeerError:
                    self.connector.release(msg.remote_prefill)  # nobody will read these blocks
                    raise
                outputs = self._decode_leg(msg, prompt_ids, msg.remote_prefill)
            else:
                prompt_ids = self._prompt_token_ids(msg)
                outputs = self._local(msg, prompt_ids)
            first = True
            async for out in outputs:
                token = self._to_message(msg.request_id, out)
                if first:
                    token.prompt_token_ids = prompt_ids
                    first = False
                if out.finish_reason == "remote_decode" and msg.request_id in self.aborted:
                    # the Abort raced with the finish: nobody will read these blocks
                    self._in_background(self.engine.release_transfer(self._transfer_id(msg.request_id)))
                    token.finish_reason = "abort"
                elif out.finish_reason == "remote_decode":
                    token.kv_transfer = self._pin(msg.request_id, prompt_ids, out)
                if out.finished:
                    self.num_finished += 1
                yield token
        finally:
            self.active.discard(msg.request_id)
            self.aborted.discard(msg.request_id)

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
                if out.finish_reason == "error":
                    raise PeerError("internal", out.error or "the request failed in the engine")
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
        request_id = msg.request_id
        problem = self._check_params(params, prompt_ids)
        if problem is not None:
            self.connector.release(params)  # prefill must not keep blocks nobody will read
            raise PeerError("invalid_request", f"remote_prefill: {problem}", "remote_prefill")
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
            if isinstance(e, RequestAborted):
                yield RequestOutput(request_id, [], "", finish_reason="abort")
                return
            raise
        finished = False
        try:
            timings, kv_done = await self._load_remote_kv(request_id, params, allocation)
            first = True
            async for out in self.engine.stream(request_id):
                finished = out.finished
                if first:
                    timings["first_decode_step_s"] = time.monotonic() - kv_done
                    out.timings = {**(out.timings or {}), **timings}
                    first = False
                if out.finish_reason == "error":
                    code = "kv_transfer_failed" if "kv_failed" in timings else "internal"
                    raise PeerError(code, out.error or "the request failed in the engine")
                yield out
        finally:
            if not finished:  # cancelled or failed: the engine's stream may never have started
                self.engine.discard(request_id)

    def _check_params(self, params: KVTransferParams, prompt_ids: list[int]) -> str | None:
        """Why ``params`` cannot describe this prompt's KV, or None."""
        if params.num_tokens != len(prompt_ids):
            return f"KV for {params.num_tokens} tokens, the prompt has {len(prompt_ids)}"
        needed = -(-params.num_tokens // self.llm.block_size)
        if len(params.block_ids) != needed:
            return f"{len(params.block_ids)} block ids for {params.num_tokens} tokens (need {needed})"
        return None

    async def _load_remote_kv(self, request_id: str, params: KVTransferParams, allocation: RemoteAllocation
                              ) -> tuple[dict[str, float], float]:
        """Read the missing blocks, then hand the request back to the engine (decode, recompute,
        fail, or abort when an ``Abort`` arrived meanwhile).  Returns the transfer's timings and
        the ``time.monotonic()`` at which the engine got the request back (where
        ``first_decode_step_s`` starts: the hand-back command, then the step)."""
        if request_id in self.aborted:  # aborted in the engine while its blocks were allocated
            self.connector.release(params)
            return {}, time.monotonic()
        started = time.monotonic()
        self.reading.add(request_id)
        try:
            # The allocation also holds the block of the first token's KV, which decode computes itself.
            prompt_blocks = allocation.block_ids[:len(params.block_ids)]
            stats = await self.connector.read_blocks(params, prompt_blocks, allocation.num_cached_blocks)
            timings = {"kv_transfer_s": time.monotonic() - started, "kv_bytes": float(stats.bytes),
                       "kv_ranges": float(stats.num_ranges)}
            ok = True
        except KVTransferError as e:
            log.warning("request %s: reading KV from %s failed: %s", request_id, params.engine_id, e)
            timings = {"kv_transfer_s": time.monotonic() - started, "kv_bytes": 0.0, "kv_failed": 1.0}
            ok = False
        finally:
            self.reading.discard(request_id)
        kv_done = time.monotonic()
        if request_id in self.aborted:  # the Abort waited for the read to stop writing our blocks
            await self.engine.abort(request_id)
        else:
            await self.engine.finish_remote_kv(request_id, ok)
        return timings, kv_done

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
        return self.llm.tokenizer.decode([token_id], skip_special_tokens=False)


async def serve(config: EngineServiceConfig, *, ready: asyncio.Event | None = None) -> None:
    """Load the engine (off the event loop), serve until cancelled, then shut down in order."""
    engine = await asyncio.get_running_loop().run_in_executor(None, LLMEngine, config)
    service = EngineService(config, engine)
    try:
        await service.start()
        if ready is not None:
            ready.set()
        while service.engine.failed is None:
            await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)
        # A dead engine thread serves nothing: exit non-zero so a supervisor restarts us.
        raise RuntimeError(f"{service.instance_id}: engine failed: {service.engine.failed!r}")
    finally:
        await asyncio.shield(service.shutdown())
