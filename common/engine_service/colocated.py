"""``ColocatedRole`` (``--role both``): whole requests on one engine, no KV transfer.

The baseline every P/D comparison uses, and what the P/D roles extend: they
serve a plain ``Generate`` the same way and add their leg of the handoff.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from common.messages import Generate, TokenOutput

if TYPE_CHECKING:
    from common.engine_service.service import EngineService


class ColocatedRole:
    """Serves whole requests; refuses both P/D legs."""

    serves_prefill_leg = False
    serves_decode_leg = False

    def __init__(self, service: EngineService):
        self.service = service

    async def start(self) -> None:
        """Nothing to set up: no transfer memory, no side channel."""

    def generate(self, msg: Generate) -> AsyncIterator[TokenOutput]:
        return self.service.serve_locally(msg)

    async def abort(self, request_id: str, peer: bytes) -> None:
        if self.service.active.get(request_id) == peer:
            await self.service.engine.abort(request_id)

    def num_transfers(self) -> int:
        return 0

    async def shutdown(self) -> None:
        """Nothing held beyond the engine's requests, which the service aborts."""
