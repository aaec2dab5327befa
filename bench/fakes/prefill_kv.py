"""A fake prefill's pinned KV, owned by the production ``PrefillHandoff``.

The handoff (random transfer ids, owners and readers checked, leases in a
``LeaseTable`` swept by its sweeper, every release path through it) gets the
fake's block accounting as its unpin port; the production ``KVSideChannel``
answers ``Handshake`` over a ``FakeTransport``, and passes ``RenewLease`` and
``ReleaseKV`` to the handoff.  The blocks are fake: a handed-off prompt pins
ceil(tokens / block_size) of them, numbered from 0.
"""

from __future__ import annotations

import asyncio

from bench.fakes.transport import FakeTransport
from common.arith import ceil_div
from common.bus import BusServer
from common.kv_transfer.leases import LeaseTable
from common.kv_transfer.ranges import KVLayout
from common.kv_transfer.side_channel import KVSideChannel
from common.messages import Fingerprint, KVTransferParams, TokenOutput
from services.prefill.handoff import PrefillHandoff

BLOCK_BYTES = 4096  # the fake KV memory's block size, as the side channel advertises it


class FakePrefillKV:
    """Blocks pinned for decode engines, through the real handoff and side channel."""

    def __init__(self, engine_id: str, fingerprint: Fingerprint, kv_server: BusServer, num_blocks: int,
                 lease_s: float, lease_sweep_s: float):
        self.engine_id = engine_id
        self.kv_server = kv_server
        self.block_size = fingerprint.block_size
        self.lease_sweep_s = lease_sweep_s
        self.handoff = PrefillHandoff(engine_id, LeaseTable(lease_s), self._unpin)
        layout = KVLayout(0, BLOCK_BYTES, num_blocks)
        self.rank = FakeTransport.serving(f"fake://{engine_id}", layout, fingerprint.num_kv_heads)
        self.transport = self.rank.transports.backends["tcp"]
        KVSideChannel(engine_id, fingerprint, [self.rank.memory], self.rank.transports.incarnation,
                      self.handoff).attach(kv_server)
        self.pinned: dict[str, int] = {}  # transfer id -> blocks pinned under it
        self.pinned_blocks = 0  # sum of pinned.values()
        self._sweeper: asyncio.Task | None = None

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self.handoff.run_sweeper(self.lease_sweep_s))

    def hand_off(self, num_tokens: int, out: TokenOutput) -> str:
        """A prefill leg's first output: pin and lease the prompt's blocks and say where to read them
        ("remote_decode"), or "abort" when an ``Abort`` came first (the handoff released them)."""
        transfer_id = self.handoff.transfer_id(out.request_id)
        num_blocks = ceil_div(num_tokens, self.block_size)
        self.pinned[transfer_id] = num_blocks
        self.pinned_blocks += num_blocks
        expiry = self.handoff.lease(out.request_id, list(range(num_blocks)))
        if expiry is None:
            return "abort"
        out.kv_transfer = KVTransferParams(
            engine_id=self.engine_id, kv_endpoint=self.kv_server.endpoint, transfer_id=transfer_id,
            block_ids=list(range(num_blocks)), num_tokens=num_tokens, first_token_id=out.token_ids[0],
            lease_expiry=expiry, first_token_logprob=out.logprobs[0] if out.logprobs else None,
            block_size=self.block_size)
        return "remote_decode"

    async def shutdown(self, release: bool) -> None:
        """Stop sweeping; ``release`` what is still pinned (a killed engine just drops it)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        if release:
            self.handoff.release_all()
        await self.handoff.drain()
        self.rank.close()

    async def _unpin(self, transfer_id: str) -> None:
        """The handoff's unpin port: give back the blocks pinned under ``transfer_id``."""
        self.pinned_blocks -= self.pinned.pop(transfer_id, 0)
