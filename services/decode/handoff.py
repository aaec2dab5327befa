"""Life cycle of a request in the decode server (``DecodeHandoff``, the ``decode`` role).

1. ``Generate(remote_prefill=params)`` arrives with the prefill's
   ``KVTransferParams``.  A ``kv_endpoint`` that cannot be dialed
   (``common.bus.endpoints``) is refused at once, before any socket exists.
   The params are checked against the prompt (token count, one block id per
   block of the PREFILL's block size, which may differ from ours); a request
   refused here, or anywhere before the read, sends ``ReleaseKV`` so prefill
   does not hold blocks nobody reads.
2. Allocate: the engine gets the request (one ``RemoteRequest``) and gives it
   blocks for the prompt plus its first token, prefix-cache hits leading; with
   too few free blocks it waits (FIFO) up to ``--remote-blocks-timeout-s``.  The
   request then waits in ``WAITING_FOR_REMOTE_KVS``.  Meanwhile the reader
   claims the transfer (``KVReader.claim``: its first ``RenewLease``).
3. Read: the connector (``common.kv_offload.MultiConnector``) fills the blocks
   that are not local hits: from the engine's host tier first when
   ``--kv-offload-cpu-gib`` is on, the rest through ``KVReader.read_blocks``,
   which copies them from the prefill engine, confirms the lease (its first
   ``RenewLease`` claims the transfer: only this engine may then renew or
   release it), then sends ``ReleaseKV`` whatever happened.  Blocks read from
   prefill are then stored to the host tier too.
4. Hand the request to the engine: ``finish_remote_kv(ok)`` decodes (or, when
   the read failed, recomputes or fails per ``--kv-load-failure-policy``).  A
   transfer whose params name other blocks than the prefill's lease holds
   (``KVBlocksRefused``: the lease's confirmation names its blocks) fails the
   request whatever the policy: its blocks are freed and nothing is cached.  An
   ``Abort`` that came during the read takes effect now, once the read stopped
   writing into the request's blocks, never before (they could be reused).
5. Stream tokens 2..., the first carrying the transfer's timings.

Push mode (``Generate(await_push=True)``, ``--kv-mode push``) is ``services/decode/push.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from common.arith import ceil_div
from common.bus.endpoints import endpoint_problem
from common.engine.async_engine import RequestAborted
from common.engine.sequence import InvalidRequest, RemoteAllocation, RemoteRequest, RequestOutput
from common.engine_service import ColocatedRole, EngineService
from common.errors import KVBlocksRefused, KVTransferError, PeerError
from common.kv_offload.connector import BlockLoad
from common.kv_offload.multi_connector import MultiConnector
from common.kv_offload.offload_connector import OffloadConnector
from common.kv_offload.pd_connector import PDConnector
from common.kv_transfer.reader import KVReader, ReadStats
from common.messages import Generate, KVTransferParams, TokenOutput
from services.decode.push import DecodePush

log = logging.getLogger(__name__)


class DecodeHandoff(ColocatedRole):
    """Serves ``Generate(remote_prefill=...)`` (and plain requests, colocated)."""

    serves_decode_leg = True

    def __init__(self, service: EngineService):
        super().__init__(service)
        self.reader: KVReader | None = None
        self.connector: MultiConnector | None = None
        self.reading: set[str] = set()  # request ids whose blocks a backend read may be writing
        self.aborted: set[str] = set()  # running request ids an Abort arrived for
        self.push: DecodePush | None = None  # push mode (``services/decode/push.py``)

    async def start(self) -> None:
        s = self.service
        self.reader = KVReader(s.open_kv_ranks(), s.instance_id, s.fingerprint, s.config, s.transports.chosen)
        host_tier = [OffloadConnector(s.engine)] if s.core.offload is not None else []
        self.connector = MultiConnector([*host_tier, PDConnector(self.reader)])
        if s.config.kv_mode == "push":
            self.push = DecodePush(self)
            self.push.start()

    async def generate(self, msg: Generate) -> AsyncIterator[TokenOutput]:
        if msg.await_push:
            async for token in self.push.generate(msg):
                yield token
            return
        params = msg.remote_prefill
        if params is None:
            async for token in self.service.serve_locally(msg):
                yield token
            return
        problem = endpoint_problem(params.kv_endpoint)
        if problem is not None:  # refused before any socket exists; there is nowhere to send even a ReleaseKV
            raise PeerError("invalid_request", f"remote_prefill.kv_endpoint: {problem}", "remote_prefill.kv_endpoint")
        try:
            try:
                prompt_ids = self.service.prompt_token_ids(msg)
            except PeerError:
                self.reader.release(params)  # nobody will read these blocks
                raise
            async for token in self.service.tokens(msg.request_id, prompt_ids,
                                                   self._decode(msg, prompt_ids, params)):
                yield token
        finally:
            self.aborted.discard(msg.request_id)

    async def abort(self, request_id: str, peer: bytes) -> None:
        """A request whose KV is being read is aborted once the read stops writing its blocks."""
        if self.service.active.get(request_id) != peer:
            return
        if self.push is not None and self.push.abort(request_id):
            return  # its blocks are freed once no write may land in them
        self.aborted.add(request_id)
        if request_id not in self.reading:
            await super().abort(request_id, peer)

    def num_transfers(self) -> int:
        return len(self.reading) + (len(self.push.pushed) if self.push is not None else 0)

    async def shutdown(self) -> None:
        if self.push is not None:
            await self.push.shutdown()
        if self.reader is not None:
            await self.reader.close()

    # ------------------------------------------------------------------ the leg

    async def _decode(self, msg: Generate, prompt_ids: list[int], params: KVTransferParams
                      ) -> AsyncIterator[RequestOutput]:
        """Allocate blocks, read the prompt's KV from prefill, then decode tokens 2..."""
        request_id = msg.request_id
        problem = self._check_params(params, prompt_ids)
        if problem is not None:
            self.reader.release(params)  # prefill must not keep blocks nobody will read
            raise PeerError("invalid_request", f"remote_prefill: {problem}", "remote_prefill")
        remote = RemoteRequest(request_id, prompt_ids, params.first_token_id, msg.sampling, params.num_tokens)
        self.reader.claim(params)  # its round trip runs while the engine allocates and the KV is read
        asked = time.monotonic()
        try:
            await asyncio.sleep(0)  # the claim leaves now: an idle engine allocates, a short read copies, unyielding
            allocation = await self.allocate(remote)
        except BaseException:
            self.reader.release(params)  # prefill must not keep blocks nobody will read
            raise
        if allocation is None:
            self.reader.release(params)
            yield RequestOutput(request_id, [], "", finish_reason="abort")
            return
        try:
            allocate_s = time.monotonic() - asked
            timings, kv_done = await self._load_remote_kv(request_id, params, allocation)
            timings["allocate_s"] = allocate_s
        except BaseException:
            self.service.engine.discard(request_id)
            raise
        async with aclosing(self.stream_decoded(request_id, timings, kv_done)) as outputs:
            async for out in outputs:
                yield out

    async def allocate(self, remote: RemoteRequest) -> RemoteAllocation | None:
        """The engine's blocks for ``remote``, waiting up to ``--remote-blocks-timeout-s`` for free ones; None
        when the request was aborted meanwhile.  ``PeerError`` (``invalid_request``, ``overloaded``)."""
        try:
            async with asyncio.timeout(self.service.config.remote_blocks_timeout_s):  # no task: an idle engine
                return await self.service.engine.add_remote(remote)  # allocates without suspending us
        except InvalidRequest as e:
            raise PeerError("invalid_request", e.message, e.param) from e
        except TimeoutError:
            raise PeerError("overloaded", f"no free KV blocks within "
                            f"{self.service.config.remote_blocks_timeout_s:g} s") from None
        except RequestAborted:
            return None

    async def stream_decoded(self, request_id: str, timings: dict[str, float], kv_done: float
                             ) -> AsyncIterator[RequestOutput]:
        """Tokens 2... of a request the engine got back at ``time.monotonic()`` ``kv_done`` (its KV landed);
        the first output carries the transfer's ``timings``.  A stream that does not finish is discarded."""
        finished = False
        try:
            first = True
            async for out in self.service.engine.stream(request_id):
                finished = out.finished
                if first and (out.new_token_ids or finished):  # not a progress output (no token yet)
                    timings["first_decode_step_s"] = time.monotonic() - kv_done
                    out.timings = {**(out.timings or {}), **timings}
                    first = False
                if out.finish_reason == "error":
                    code = "kv_transfer_failed" if "kv_failed" in timings else "internal"
                    raise PeerError(code, out.error or "the request failed in the engine")
                yield out
        finally:
            if not finished:  # cancelled or failed: the engine's stream may never have started
                self.service.engine.discard(request_id)

    def _check_params(self, params: KVTransferParams, prompt_ids: list[int]) -> str | None:
        """Why ``params`` cannot describe this prompt's KV, or None."""
        if params.num_tokens != len(prompt_ids):
            return f"KV for {params.num_tokens} tokens, the prompt has {len(prompt_ids)}"
        block_size = params.block_size or self.service.core.block_size  # 0: a sender older than the field
        needed = ceil_div(params.num_tokens, block_size)
        if len(params.block_ids) != needed:
            return (f"{len(params.block_ids)} block ids for {params.num_tokens} tokens in blocks of {block_size} "
                    f"(need {needed})")
        return None

    async def _load_remote_kv(self, request_id: str, params: KVTransferParams, allocation: RemoteAllocation
                              ) -> tuple[dict[str, float], float]:
        """Read the missing blocks, then hand the request back to the engine (decode, recompute,
        fail, or abort when an ``Abort`` arrived meanwhile).  Returns the transfer's timings and
        the ``time.monotonic()`` at which the engine got the request back (where
        ``first_decode_step_s`` starts: the hand-back command, then the step)."""
        engine = self.service.engine
        if request_id in self.aborted:  # aborted in the engine while its blocks were allocated
            self.reader.release(params)
            return {}, time.monotonic()
        started = time.monotonic()
        refused: KVBlocksRefused | None = None
        self.reading.add(request_id)
        try:
            # The allocation also holds the block of the first token's KV, which decode computes itself.
            load = BlockLoad(request_id, allocation.block_ids[:ceil_div(params.num_tokens,
                                                                        self.service.core.block_size)], params)
            loaded = await self.connector.load_each(load, allocation.num_cached_blocks)
            stats = loaded.get(PDConnector.name, ReadStats(0, 0, 0, 0.0))  # what came from prefill
            timings = {"kv_transfer_s": time.monotonic() - started, "kv_read_s": stats.seconds,
                       "kv_bytes": float(stats.bytes), "kv_ranges": float(stats.num_ranges)}
            if OffloadConnector.name in loaded:
                timings["kv_host_blocks"] = float(loaded[OffloadConnector.name].num_blocks)
            ok = True
        except KVTransferError as e:
            log.warning("request %s: reading KV from %s failed: %s", request_id, params.engine_id, e)
            timings = {"kv_transfer_s": time.monotonic() - started, "kv_bytes": 0.0, "kv_failed": 1.0}
            ok = False
            refused = e if isinstance(e, KVBlocksRefused) else None
        finally:
            self.reading.discard(request_id)
        kv_done = time.monotonic()
        if request_id in self.aborted or refused is not None:  # the read stopped writing our blocks
            await engine.abort(request_id)  # a refused transfer's blocks are freed, nothing of them cached
        else:
            engine.finish_remote_kv(request_id, ok)  # not awaited: the engine steps before the loop hears of it
            if ok:
                self.connector.store(load)
        if refused is not None:
            raise PeerError("kv_transfer_failed", str(refused), "remote_prefill.block_ids")
        return timings, kv_done
