"""Same-host lease confirmation: the prefill's shared-memory lease table (``LeaseSlots``) and a reader that
confirms a read there, racing with an Abort or an expiry, next to a cross-host reader that still confirms
over the bus.  Real ``/dev/shm`` files and a real bus; the prefill's side runs in this process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import torch

from common.bus import BusServer
from common.engine.kv_cache import KVCache
from common.errors import KVTransferError
from common.kv_transfer.config import KVTransferConfig
from common.kv_transfer.lease_slots import PREFIX, LeaseSlots, LeaseSlotsView
from common.kv_transfer.leases import LeaseTable
from common.kv_transfer.ranges import KVLayout
from common.kv_transfer.rank_io import LocalRankIO
from common.kv_transfer.reader import KVReader
from common.kv_transfer.shm import SharedKVFile
from common.kv_transfer.side_channel import KVSideChannel
from common.messages import Fingerprint, KVRequest, KVTransferParams
from services.prefill.handoff import PrefillHandoff
from tests.fakes import mori as fake_mori
from tests.procs import Clock, eventually

GEOMETRY = dict(num_layers=2, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float16, device="cpu")
FINGERPRINT = Fingerprint(model="tiny", dtype="float16", block_size=4, num_layers=2, num_kv_heads=2, head_dim=8,
                          kv_layout=KVCache.LAYOUT, transfer_backend="mori")


# -- the table ------------------------------------------------------------------


@pytest.fixture
def slots(tmp_path):
    table = LeaseSlots("prefill/0", num_slots=2, directory=tmp_path)
    yield table
    table.close()


def test_a_freed_slot_changes_generation_and_never_repeats_one(slots, tmp_path):
    view = LeaseSlotsView(slots.name, tmp_path)
    slot, generation = slots.take()
    assert view.held(slot, generation) and generation % 2 == 1
    slots.free(slot)
    assert not view.held(slot, generation)
    seen = {generation}
    for _ in range(3):  # the slot is reused: each lease has a generation of its own
        again, generation = slots.take()
        assert again == slot and generation not in seen and view.held(slot, generation)
        seen.add(generation)
        slots.free(slot)
    assert not view.held(5, 1) and not view.held(-1, 0)  # outside the table


def test_slots_are_not_leaked_and_run_out_without_failing(slots):
    taken = [slots.take(), slots.take()]
    assert slots.take() is None and len(slots) == 2  # full: that lease confirms over the bus
    for slot, _ in taken:
        slots.free(slot)
    assert len(slots) == 0
    with pytest.raises(ValueError, match="not taken"):
        slots.free(taken[0][0])


def test_the_owner_unlinks_its_table_and_a_dead_owners_table_is_removed(tmp_path):
    table = LeaseSlots("p", directory=tmp_path)
    assert (tmp_path / table.name).exists() and table.name.startswith(f"{PREFIX}{os.getpid()}-p-")
    table.close()
    table.close()
    assert not list(tmp_path.iterdir())
    stale = tmp_path / f"{PREFIX}999999999-p-0"  # no such process
    stale.write_bytes(b"\0" * 8)
    LeaseSlots("q", directory=tmp_path).close()
    assert not stale.exists()


@pytest.mark.parametrize("name, content", [("../etc/passwd", None), (f"{PREFIX}1-p/../x", None),
                                           (f"{PREFIX}1-p-odd", b"\0" * 7), (f"{PREFIX}1-p-empty", b"")])
def test_a_reader_maps_only_a_lease_table(tmp_path, name, content):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError):
        LeaseSlotsView(name, tmp_path)


# -- a reader on the same host, and one that is not -------------------------------


@dataclass
class Prefill:
    kv: KVCache
    handoff: PrefillHandoff
    clock: Clock
    server: BusServer
    renewals: list  # transfer ids of every RenewLease, in order

    def params(self, block_ids: list[int], request_id: str = "t1") -> KVTransferParams:
        transfer_id = self.handoff.begin(request_id, b"gateway")
        expiry = self.handoff.lease(request_id, block_ids)
        slot, generation = self.handoff.lease_slot(transfer_id)
        return KVTransferParams("prefill-0", self.server.endpoint, transfer_id, block_ids,
                                self.kv.block_size * len(block_ids), 1, expiry, lease_slot=slot,
                                lease_generation=generation)


def config(transport: str) -> KVTransferConfig:
    cfg = KVTransferConfig(kv_backend="mori", kv_transport=transport, kv_lease_seconds=30.0,
                           kv_handshake_timeout_s=2.0, kv_rpc_timeout_s=2.0, kv_renew_interval_s=5.0,
                           kv_transfer_threads=2)
    cfg.validate()
    return cfg


@contextlib.contextmanager
def shm_rank(transport: str):
    """A TP 1 engine's rank whose KV cache is a ``/dev/shm`` file, serving ``transport``."""
    file = SharedKVFile(fallback=False)
    kv = KVCache(num_blocks=8, allocate=file.allocate, **GEOMETRY)
    rank = LocalRankIO.open(config(transport), 0, (0, kv.num_kv_heads), kv.data, KVLayout.of(kv))
    try:
        yield kv, rank
    finally:
        rank.close()
        file.close()


@contextlib.asynccontextmanager
async def serving_prefill() -> AsyncIterator[Prefill]:
    """A prefill's KV side serving shm and tcp (the fake MoRI), with its lease table and an injected clock."""
    clock = Clock()
    clock.now = time.time()  # lease expiries travel as unix times: a reader renews one that looks due
    table = LeaseSlots("prefill-0")
    with shm_rank("shm,tcp") as (kv, rank):
        kv.data.copy_(torch.randn_like(kv.data))
        handoff = PrefillHandoff("prefill-0", LeaseTable(30.0, clock=clock), lambda tid: asyncio.sleep(0),
                                 slots=table)
        renewals = []
        renew = handoff.renew
        handoff.renew = lambda ids, peer: renewals.extend(ids) or renew(ids, peer)
        channel = KVSideChannel("prefill-0", FINGERPRINT, [rank.memory], rank.transports.incarnation, handoff,
                                table.name)
        server = BusServer("tcp://127.0.0.1:0", KVRequest, name="kv-prefill")
        channel.attach(server)
        await server.start()
        try:
            yield Prefill(kv, handoff, clock, server, renewals)
        finally:
            await server.close()
            table.close()


class HeldCopy:
    """Holds every backend copy of ``rank`` (``transfer``: ranges and whole blocks) until ``go`` is set;
    ``started`` once one began."""

    def __init__(self, rank: LocalRankIO):
        self.started, self.go = threading.Event(), threading.Event()
        for backend in rank.transports.backends.values():
            transfer = backend.transfer

            def held(*args, transfer=transfer, **kwargs):
                self.started.set()
                assert self.go.wait(10)
                return transfer(*args, **kwargs)

            backend.transfer = held


@pytest.fixture
async def prefill():
    fake_mori.install()
    try:
        async with serving_prefill() as served:
            yield served
    finally:
        fake_mori.uninstall()


@pytest.fixture
def decode():
    """A decode engine's reader over ``transport`` (its KV in a shm file), its rank's copies held."""
    stack = contextlib.ExitStack()

    def make(transport: str = "shm") -> tuple[KVReader, KVCache, HeldCopy]:
        kv, rank = stack.enter_context(shm_rank(transport))
        return KVReader([rank], "decode-0", FINGERPRINT, config(transport), rank.transports.chosen), kv, HeldCopy(rank)

    with stack:
        yield make


async def test_a_same_host_read_claims_alongside_the_copy_and_confirms_in_the_table(prefill, decode):
    reader, kv, copy = decode()
    try:
        params = prefill.params([1, 2])
        read = asyncio.create_task(reader.read_blocks(params, [3, 4]))
        await eventually(lambda: copy.started.is_set() and prefill.renewals == [params.transfer_id])
        copy.go.set()  # the claim was answered during the copy: nothing crosses the bus after it
        await read
        assert prefill.renewals == [params.transfer_id]
        assert (await reader.peers.peer("prefill-0", prefill.server.endpoint)).leases is not None
        assert torch.equal(kv.data[3:5], prefill.kv.data[1:3])
    finally:
        await reader.close()
    assert len(prefill.handoff) == 0 and len(prefill.handoff.slots) == 0  # released, its slot given back


@pytest.mark.parametrize("race", ["abort", "expiry"])
async def test_a_same_host_read_that_races_a_release_fails(prefill, decode, race):
    reader, _, copy = decode()
    try:
        params = prefill.params([2])
        read = asyncio.create_task(reader.read_blocks(params, [0]))
        await eventually(lambda: copy.started.is_set() and prefill.renewals)  # claimed: only the table can tell
        if race == "abort":
            prefill.handoff.abort("t1", b"gateway")
        else:
            prefill.clock.now += 31
            assert prefill.handoff.expire() == [params.transfer_id]
        copy.go.set()
        with pytest.raises(KVTransferError, match="ended during the read; the blocks may be reused"):
            await read
        assert prefill.renewals == [params.transfer_id]  # decided without a round trip after the copy
    finally:
        await reader.close()


@pytest.mark.parametrize("elsewhere", ["forced tcp", "another host"])
async def test_a_reader_not_on_the_host_confirms_over_the_bus_after_the_read(prefill, decode, monkeypatch, elsewhere):
    if elsewhere == "another host":
        monkeypatch.setattr("common.kv_transfer.transport_set.this_host_id", lambda: "elsewhere/boot")
    reader, kv, copy = decode("tcp" if elsewhere == "forced tcp" else "shm,tcp")
    try:
        params = prefill.params([1, 2])
        read = asyncio.create_task(reader.read_blocks(params, [3, 4]))
        await eventually(copy.started.is_set)
        assert (await reader.peers.peer("prefill-0", prefill.server.endpoint)).leases is None
        copy.go.set()
        await read
        assert prefill.renewals == [params.transfer_id]  # the confirmation after the read
        assert reader.peers.chosen["prefill-0"] == "tcp"
        assert torch.equal(kv.data[3:5], prefill.kv.data[1:3])
        raced = prefill.params([6], "t2")
        copy.started.clear()
        copy.go.clear()
        read = asyncio.create_task(reader.read_blocks(raced, [0]))
        await eventually(copy.started.is_set)
        prefill.handoff.abort("t2", b"gateway")
        copy.go.set()
        with pytest.raises(KVTransferError, match="ended during the read"):
            await read
    finally:
        await reader.close()
