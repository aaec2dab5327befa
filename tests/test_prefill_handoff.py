"""The prefill handoff: every release path frees a request's pinned blocks exactly once.

A real engine (the demo checkpoint on CPU) computes each prefill leg and pins
its prompt's blocks; the handoff's engine port is the engine's own unpin,
wrapped to count the calls.  Each path releases the transfer, then every other
path tries again: none may reach the engine, and its blocks are all free.
"""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from bench.engine_driver import prompt_ids
from common.engine.async_engine import AsyncEngine
from common.engine.config import EngineConfig
from common.engine.engine import LLMEngine
from common.engine.sequence import InvalidRequest
from common.errors import PeerError
from common.kv_transfer.leases import LeaseTable
from common.messages import SamplingParams
from services.prefill.handoff import PrefillHandoff
from tests.procs import Clock, eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

LEASE_S = 30.0
GATEWAY, DECODE = b"gateway", b"decode"  # the peers that sent the Generate and that read the transfer
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


class Prefill:
    """A real engine and a handoff whose unpin port is the engine's, counted."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine
        self.clock = Clock()
        self.unpins: list[tuple[str, bool]] = []  # (transfer id, whether the engine had blocks pinned under it)
        self.transfer_ids: dict[str, str] = {}  # request id -> the transfer id its leg got
        self.pinned: dict[str, list[int]] = {}  # request id -> the blocks its leg pinned
        self.handoff = PrefillHandoff("p0", LeaseTable(LEASE_S, clock=self.clock), self.unpin)

    async def unpin(self, transfer_id: str) -> bool:
        freed = await self.engine.release_transfer(transfer_id)
        self.unpins.append((transfer_id, freed))
        return freed

    async def finish_leg(self, request_id: str) -> None:
        """Begin the transfer and run the leg until the engine pinned its blocks (not yet leased)."""
        transfer_id = self.transfer_ids[request_id] = self.handoff.begin(request_id, GATEWAY)
        outs = [out async for out in self.engine.generate(request_id, prompt_ids(40, seed=len(request_id)),
                                                          GREEDY, pin_for_transfer=transfer_id)]
        assert outs[-1].finish_reason == "remote_decode" and len(outs[-1].pinned_block_ids) == 3
        self.pinned[request_id] = outs[-1].pinned_block_ids

    async def leased_leg(self, request_id: str) -> None:
        await self.finish_leg(request_id)
        assert self.handoff.lease(request_id, self.pinned[request_id]) == self.clock.now + LEASE_S

    def try_every_path(self, request_id: str) -> None:
        """Every release path once more, after the transfer was released."""
        handoff = self.handoff
        handoff.release(self.transfer_ids[request_id], DECODE)
        handoff.abort(request_id, GATEWAY)
        assert handoff.lease(request_id, []) is None
        handoff.settle(request_id)
        self.clock.now += 10 * LEASE_S
        assert handoff.expire() == []
        handoff.release_all()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine():
    core = LLMEngine(EngineConfig(model="demo", dtype="float32", device="cpu", num_kv_blocks=64))
    async_engine = AsyncEngine(core)
    yield async_engine
    await async_engine.shutdown(timeout=10)


@pytest.fixture
def prefill(engine):
    return Prefill(engine)


async def release_kv(prefill: Prefill, rid: str) -> None:
    await prefill.leased_leg(rid)
    prefill.handoff.release(prefill.transfer_ids[rid], DECODE)


async def abort_leased(prefill: Prefill, rid: str) -> None:
    await prefill.leased_leg(rid)
    prefill.handoff.abort(rid, GATEWAY)


async def lease_expiry(prefill: Prefill, rid: str) -> None:
    await prefill.leased_leg(rid)
    prefill.clock.now += LEASE_S - 1
    assert prefill.handoff.expire() == []
    prefill.clock.now += 1
    assert prefill.handoff.expire() == [prefill.transfer_ids[rid]]


async def abort_races_with_the_finish(prefill: Prefill, rid: str) -> None:
    """The Abort arrives while computing; the engine finishes (and pins) anyway."""
    transfer_id = prefill.transfer_ids[rid] = prefill.handoff.begin(rid, GATEWAY)
    prefill.handoff.abort(rid, GATEWAY)
    outs = [out async for out in prefill.engine.generate(rid, prompt_ids(40, seed=3), GREEDY,
                                                         pin_for_transfer=transfer_id)]
    assert outs[-1].finish_reason == "remote_decode"
    assert prefill.handoff.lease(rid, outs[-1].pinned_block_ids) is None  # released, not leased


async def cancelled_around_the_finish(prefill: Prefill, rid: str) -> None:
    """The engine pinned, but the stream ended before the finish was leased."""
    await prefill.finish_leg(rid)
    prefill.handoff.settle(rid)


async def shutdown(prefill: Prefill, rid: str) -> None:
    await prefill.leased_leg(rid)
    prefill.handoff.release_all()


@pytest.mark.parametrize("path", [release_kv, abort_leased, lease_expiry, abort_races_with_the_finish,
                                  cancelled_around_the_finish, shutdown])
async def test_each_release_path_frees_pinned_blocks_exactly_once(prefill: Prefill, path):
    rid = f"r-{path.__name__}"
    await path(prefill, rid)
    prefill.try_every_path(rid)
    await prefill.handoff.drain()
    assert prefill.unpins == [(prefill.transfer_ids[rid], True)]
    assert len(prefill.handoff) == 0 and len(prefill.handoff.leases) == 0
    await eventually(lambda: prefill.engine.latest_stats.kv_blocks_used == 0, timeout=30)
    assert prefill.engine.latest_stats.kv_blocks_pinned == 0


@pytest.mark.parametrize("aborted", [False, True])
async def test_a_leg_that_ends_before_pinning_releases_once(prefill: Prefill, aborted: bool):
    """The engine refuses the leg (or an Abort came too): one unpin when the stream ends, which finds nothing."""
    rid = f"r-refused-{aborted}"
    transfer_id = prefill.transfer_ids[rid] = prefill.handoff.begin(rid, GATEWAY)
    if aborted:
        prefill.handoff.abort(rid, GATEWAY)
    with pytest.raises(InvalidRequest):
        async for _ in prefill.engine.generate(rid, prompt_ids(40, seed=4), SamplingParams(max_tokens=0),
                                               pin_for_transfer=transfer_id):
            pass
    prefill.handoff.settle(rid)
    prefill.try_every_path(rid)
    await prefill.handoff.drain()
    assert prefill.unpins == [(transfer_id, False)]
    assert len(prefill.handoff) == 0


async def test_a_transfer_still_held_refuses_the_same_request_id(prefill: Prefill):
    await prefill.leased_leg("r-twice")
    with pytest.raises(PeerError) as err:
        prefill.handoff.begin("r-twice", GATEWAY)
    assert (err.value.code, err.value.param) == ("invalid_request", "request_id")
    prefill.handoff.release_all()
    await prefill.handoff.drain()
    again = prefill.handoff.begin("r-twice", GATEWAY)  # released: the id may run again, under a new transfer id
    prefill.handoff.settle("r-twice")
    await prefill.handoff.drain()
    assert [tid for tid, _ in prefill.unpins] == [prefill.transfer_ids["r-twice"], again]


async def test_sweeper_expires_on_its_own(engine):
    prefill = Prefill(engine)
    prefill.handoff.leases = LeaseTable(0.05)  # real time
    await prefill.finish_leg("r-swept")
    assert prefill.handoff.lease("r-swept", prefill.pinned["r-swept"]) is not None
    sweeper = asyncio.create_task(prefill.handoff.run_sweeper(0.02))
    try:
        await eventually(lambda: prefill.unpins, timeout=30)
    finally:
        sweeper.cancel()
    assert prefill.unpins == [(prefill.transfer_ids["r-swept"], True)]


async def test_renewals_never_push_a_lease_past_its_maximum_life():
    clock = Clock()
    leases = LeaseTable(10.0, clock=clock, max_seconds=25.0)
    start = clock.now
    leases.start("t")
    expiries = []
    for _ in range(3):
        clock.now += 8
        expiries.append(leases.renew(["t"])["t"] - start)
    assert expiries == [18.0, 25.0, 25.0]
    clock.now = start + 25.0
    assert leases.expired() == ["t"] and leases.renew(["t"]) == {}


async def test_a_peer_holding_its_cap_of_pinned_blocks_is_refused_until_they_are_released():
    async def unpin(transfer_id: str) -> None:
        pass

    handoff = PrefillHandoff("p0", LeaseTable(LEASE_S), unpin, max_pinned_per_peer=4)
    handoff.begin("a1", GATEWAY)
    handoff.lease("a1", [0, 1, 2])
    handoff.begin("a2", GATEWAY)  # 3 < 4: one more leg may run
    handoff.lease("a2", [3, 4])
    with pytest.raises(PeerError) as refused:
        handoff.begin("a3", GATEWAY)
    assert refused.value.code == "overloaded"
    handoff.begin("b1", b"another gateway")  # the cap is per peer
    handoff.abort("a1", GATEWAY)
    handoff.begin("a3", GATEWAY)
