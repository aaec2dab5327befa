"""Control traffic is never starved by data traffic: a flood of ``ReleaseKV`` at a real prefill engine's
KV side channel neither lets its registration lapse (its heartbeats keep a short lease alive) nor piles up
unanswered work (each flooded request is answered or refused, and all of them end)."""

from __future__ import annotations

import asyncio
import time

from bench.processes import Processes
from common.bus import FLAG_FINAL, BusClient
from common.errors import BusError
from common.messages import Ack, Instance, MembershipChange, ReleaseKV
from common.registry_client import MembershipWatcher
from tests.procs import eventually

HEARTBEAT_S, LEASE_S = 0.2, 2.0
FLOOD_S = 4.0
BATCH = 500  # requests sent per turn of the flooding loop


class Flood:
    """Sends ``ReleaseKV`` of unknown transfers as fast as the loop allows; counts how each ended."""

    def __init__(self, client: BusClient):
        self.client = client
        self.sent = self.answered = self.refused = 0

    async def run(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for _ in range(BATCH):
                self.client.request(ReleaseKV([f"flood/{self.sent}"]), self._ended)
                self.sent += 1
            await asyncio.sleep(0)

    def _ended(self, flag: int, reply: object) -> None:
        assert flag == FLAG_FINAL
        if isinstance(reply, Ack):
            self.answered += 1
        else:
            assert isinstance(reply, BusError), reply
            self.refused += 1


async def test_a_release_flood_does_not_starve_the_prefill_heartbeats():
    async with Processes() as procs:
        procs.start_registry("--heartbeat-interval-s", str(HEARTBEAT_S), "--lease-ttl-s", str(LEASE_S))
        prefill = procs.start_engine("prefill", "prefill")
        await procs.wait_registered("prefill")
        lapses: list[MembershipChange] = []

        def heard(change: MembershipChange, instance: Instance) -> None:
            if instance.id == "prefill" and change in ("expired", "left"):
                lapses.append(change)

        watcher = MembershipWatcher(procs.registry_endpoint)
        watcher.add_listener(heard)
        watcher.start()
        client = BusClient(prefill.kv_endpoint, timeout=30.0)
        try:
            await watcher.wait_ready(timeout=10)
            flood = Flood(client)
            await flood.run(FLOOD_S)
            await eventually(lambda: flood.answered + flood.refused == flood.sent, timeout=60)
            outcome = f"{flood.sent} sent, {flood.answered} answered, {flood.refused} refused"
            assert flood.answered > 0, outcome
            assert lapses == [], f"the registry let the prefill lapse during the flood ({outcome})"
            assert "prefill" in await procs.instances()
            procs.check_alive("prefill")
        finally:
            await client.close()
            await watcher.close()
