"""``PrefillRole`` (``--role prefill``): the prefill leg, its side channel and the lease sweeper.

The request's KV, from pin to release, belongs to ``PrefillHandoff``
(``services/prefill/handoff.py``, whose docstring walks a request's life cycle);
push mode's writes belong to ``PrefillPush`` (``services/prefill/push.py``).  This
role wires them to the engine service: the engine's unpin as the handoff's port,
the side channel's renew/release through the handoff, ``Abort`` and shutdown
through both.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from functools import partial

from common.bus.curve import Peer
from common.bus.server import sender
from common.engine.sequence import RequestOutput
from common.engine_service import ColocatedRole, EngineService
from common.kv_transfer.lease_slots import LeaseSlots
from common.kv_transfer.leases import LeaseTable
from common.kv_transfer.side_channel import KVSideChannel
from common.kv_transfer.transports import SAME_HOST
from common.messages import Generate, KVTransferParams, TokenOutput
from services.prefill.handoff import PrefillHandoff
from services.prefill.push import PrefillPush


class PrefillRole(ColocatedRole):
    """Serves ``Generate(do_remote_decode)`` (and plain requests, colocated)."""

    serves_prefill_leg = True

    def __init__(self, service: EngineService):
        super().__init__(service)
        leases = LeaseTable(service.config.kv_lease_seconds, max_seconds=service.config.kv_lease_max_seconds)
        self.handoff = PrefillHandoff(service.instance_id, leases, service.engine.release_transfer,
                                      service.config.kv_max_pinned_blocks_per_peer)
        self._sweeper: asyncio.Task | None = None
        self.push: PrefillPush | None = None  # push mode (``services/prefill/push.py``)

    async def start(self) -> None:
        s = self.service
        ranks = [rank.memory for rank in s.open_kv_ranks()]
        if any(transport in SAME_HOST.values() for transport in s.transports.backends):
            self.handoff.slots = LeaseSlots(s.instance_id)  # same-host readers confirm leases in it
        side_channel = KVSideChannel(s.instance_id, s.fingerprint, ranks, s.transports.incarnation, self.handoff,
                                     self.handoff.slots.name if self.handoff.slots is not None else "")
        side_channel.attach(s.kv_server)
        self._sweeper = asyncio.create_task(self.handoff.run_sweeper(s.config.kv_lease_sweep_interval_s))
        if s.config.kv_mode == "push":
            self.push = PrefillPush(s)

    async def generate(self, msg: Generate) -> AsyncIterator[TokenOutput]:
        if not msg.do_remote_decode:
            async for token in self.service.serve_locally(msg):
                yield token
            return
        if msg.push_to is not None:
            async for token in self.push.generate(msg, msg.push_to):
                yield token
            return
        request_id = msg.request_id
        prompt_ids = self.service.prompt_token_ids(msg)
        transfer_id = self.handoff.begin(request_id, sender())
        try:
            outputs = self.service.local_outputs(request_id, prompt_ids, msg.sampling, pin_for_transfer=transfer_id)
            async for token in self.service.tokens(request_id, prompt_ids, outputs,
                                                   partial(self._hand_off, len(prompt_ids))):
                yield token
        finally:
            self.handoff.settle(request_id)

    def _hand_off(self, num_tokens: int, out: RequestOutput, token: TokenOutput) -> None:
        """The prefill leg's final output: lease its pinned blocks and say where to read them."""
        if out.finish_reason != "remote_decode":
            return
        block_ids = list(out.pinned_block_ids or [])
        expiry = self.handoff.lease(out.request_id, block_ids)
        if expiry is None:  # an Abort raced with the finish: the blocks are released, nobody reads them
            token.finish_reason = "abort"
            return
        transfer_id = self.handoff.transfer_id(out.request_id)
        slot, generation = self.handoff.lease_slot(transfer_id)
        token.kv_transfer = KVTransferParams(
            engine_id=self.service.instance_id, kv_endpoint=self.service.kv_endpoint,
            transfer_id=transfer_id, block_ids=block_ids,
            num_tokens=num_tokens, first_token_id=out.new_token_ids[0], lease_expiry=expiry,
            first_token_logprob=out.logprobs[0] if out.logprobs else None, incarnation=self.service.transports.incarnation,
            block_size=self.service.core.block_size, tensor_parallel_size=self.service.core.tp.world_size,
            lease_slot=slot, lease_generation=generation,
        )  # fmt: skip

    async def abort(self, request_id: str, peer: Peer) -> None:
        await super().abort(request_id, peer)
        self.handoff.abort(request_id, peer)

    def num_transfers(self) -> int:
        return len(self.handoff.leases)

    async def shutdown(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        self.handoff.release_all()
        await self.handoff.drain()
        if self.handoff.slots is not None:
            self.handoff.slots.close()
        if self.push is not None:
            await self.push.shutdown()
