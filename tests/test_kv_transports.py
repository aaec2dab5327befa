"""The KV transport choice: what an engine serves (``plan``), what a reader tries per peer (``candidates``),
and what ``TransportSet`` opens for real backends on this host."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from bench.fakes import fingerprint
from bench.fakes.prefill_kv import BLOCK_BYTES
from bench.fakes.transport import FakeTransport
from common.bus import BusServer
from common.config import ConfigError
from common.errors import HandshakeError

from common.kv_transfer.backend import BackendUnavailable
from common.kv_transfer.config import KVTransferConfig
from common.kv_transfer.leases import LeaseTable
from common.kv_transfer.rank_io import LocalRankIO, rank_memory
from common.kv_transfer.ranges import ByteRanges, KVLayout
from common.kv_transfer.reader import KVReader
from common.kv_transfer.shm import SharedKVFile
from common.kv_transfer.side_channel import KVSideChannel
from common.kv_transfer.status import TransferStatus
from common.kv_transfer.transport_set import TransportSet, shared_kv_file
from common.kv_transfer.transports import (
    Placement,
    TransportError,
    TransportPlan,
    candidates,
    plan,
    rdma_devices,
    this_host_id,
)
from common.messages import KVRequest, MemoryRegion
from services.prefill.handoff import PrefillHandoff
from tests.test_engine_addresses import routable_address

HOST_A_CPU = Placement("a", "cpu")
HOST_A_GPU = Placement("a", "cuda")
HOST_B_CPU = Placement("b", "cpu")
HOST_B_GPU = Placement("b", "cuda")


@pytest.mark.parametrize(("kv_transport", "memory", "rdma", "expected"), [
    ("auto", "cpu", False, TransportPlan("shm", "tcp")),
    ("auto", "cuda", False, TransportPlan("nvlink", "tcp")),
    ("auto", "cuda", True, TransportPlan("nvlink", "rdma")),
    ("tcp", "cuda", True, TransportPlan(None, "tcp")),
    ("rdma", "cpu", True, TransportPlan(None, "rdma")),
    ("shm", "cpu", False, TransportPlan("shm", None)),
    ("nvlink", "cuda", False, TransportPlan("nvlink", None)),
])
def test_plan_serves_the_same_host_transport_of_its_memory_and_the_network(kv_transport, memory, rdma, expected):
    assert plan(kv_transport, memory, rdma) == expected


@pytest.mark.parametrize(("kv_transport", "memory", "rdma", "expected"), [
    ("auto", "cpu", False, TransportPlan("shm", None, fallback="tcp")),
    ("auto", "cuda", True, TransportPlan("nvlink", None, fallback="rdma")),
    ("tcp", "cpu", False, TransportPlan(None, "tcp")),  # forced: served, though it listens everywhere
    ("shm,tcp", "cpu", False, TransportPlan("shm", "tcp")),  # both asked for
    ("tcp,nvlink", "cuda", True, TransportPlan("nvlink", "tcp")),
])
def test_a_loopback_kv_host_opens_the_network_transport_only_as_a_fallback(kv_transport, memory, rdma, expected):
    assert plan(kv_transport, memory, rdma, loopback_only=True) == expected


@pytest.mark.parametrize(("kv_transport", "memory", "rdma", "match"), [
    ("nvlink", "cpu", False, "nvlink moves cuda memory; this engine's KV is in cpu memory"),
    ("shm", "cuda", False, "shm moves cpu memory; this engine's KV is in cuda memory"),
    ("rdma", "cpu", False, "no RDMA devices"),
    ("ucx", "cpu", False, "unknown KV transport 'ucx'"),
    ("shm,rdma,tcp", "cpu", True, "unknown KV transport"), ("tcp,rdma", "cpu", True, "unknown KV transport"),
    ("nvlink,tcp", "cpu", False, "--kv-transport nvlink,tcp: nvlink moves cuda memory"),
])
def test_plan_refuses_a_forced_transport_this_engine_cannot_serve(kv_transport, memory, rdma, match):
    with pytest.raises(TransportError, match=match):
        plan(kv_transport, memory, rdma)


@pytest.mark.parametrize(("ours", "peer", "offers", "expected"), [
    (HOST_A_CPU, HOST_A_CPU, ["shm", "tcp"], ["shm", "tcp"]),  # same host: shared memory first
    (HOST_A_GPU, HOST_A_GPU, ["nvlink", "tcp"], ["nvlink", "tcp"]),  # same host, GPUs: CUDA IPC first
    (HOST_A_CPU, HOST_B_CPU, ["shm", "tcp"], ["tcp"]),  # other host: the network only
    (HOST_A_GPU, HOST_B_GPU, ["nvlink", "rdma"], ["rdma"]),
    (HOST_A_CPU, HOST_A_GPU, ["shm", "nvlink", "tcp"], ["tcp"]),  # one host, different memory kinds
])
def test_auto_tries_the_same_host_transport_then_the_network(ours, peer, offers, expected):
    assert candidates("auto", ours, peer, offers, offers) == expected


def test_auto_skips_what_one_side_does_not_offer():
    assert candidates("auto", HOST_A_CPU, HOST_A_CPU, ["tcp"], ["shm", "tcp"]) == ["tcp"]
    assert candidates("auto", HOST_A_CPU, HOST_A_CPU, ["shm", "tcp"], ["tcp"]) == ["tcp"]
    with pytest.raises(TransportError, match="we offer tcp, the peer offers rdma"):
        candidates("auto", HOST_A_CPU, HOST_B_CPU, ["tcp"], ["rdma"])


def test_a_forced_transport_is_the_only_candidate():
    assert candidates("tcp", HOST_A_CPU, HOST_A_CPU, ["tcp"], ["shm", "tcp"]) == ["tcp"]
    assert candidates("shm", HOST_A_CPU, HOST_A_CPU, ["shm"], ["shm", "tcp"]) == ["shm"]


def test_a_forced_pair_is_tried_in_its_order_where_each_can_work():
    assert candidates("shm,tcp", HOST_A_CPU, HOST_A_CPU, ["shm", "tcp"], ["shm", "tcp"]) == ["shm", "tcp"]
    assert candidates("shm,tcp", HOST_A_CPU, HOST_B_CPU, ["shm", "tcp"], ["shm", "tcp"]) == ["tcp"]  # other host
    assert candidates("shm,tcp", HOST_A_CPU, HOST_A_CPU, ["shm", "tcp"], ["tcp"]) == ["tcp"]


@pytest.mark.parametrize(("forced", "ours", "peer", "match"), [
    ("shm", HOST_A_CPU, HOST_B_CPU, "shm needs both engines on one host with KV in cpu memory"),
    ("nvlink", HOST_A_GPU, HOST_B_GPU, "nvlink needs both engines on one host with KV in cuda memory"),
    ("nvlink", HOST_A_GPU, HOST_A_CPU, "nvlink needs both engines on one host"),
])
def test_a_forced_same_host_transport_across_hosts_fails_the_handshake_with_the_reason(forced, ours, peer, match):
    with pytest.raises(TransportError, match=match):
        candidates(forced, ours, peer, [forced, "tcp"], [forced, "tcp"])


def test_this_host_id_is_stable_and_names_the_host():
    assert this_host_id() == this_host_id()
    assert this_host_id().startswith(__import__("socket").gethostname() + "/")


def config(**over) -> KVTransferConfig:
    cfg = KVTransferConfig(**over)
    cfg.validate()
    return cfg


def region_of(t: torch.Tensor) -> MemoryRegion:
    return MemoryRegion(t.data_ptr(), t.numel() * t.element_size())


@pytest.mark.parametrize("loopback", [False, True])
def test_auto_serves_shm_and_the_network_when_the_cache_is_a_shared_file(loopback):
    """With a loopback --kv-host no other host could use the network transport: shm alone (issue 14, defect 9)."""
    cfg = config(kv_transport="auto", kv_host="127.0.0.1" if loopback else routable_address())
    kv_file = shared_kv_file(cfg, torch.device("cpu"))
    assert kv_file is not None
    try:
        kv = kv_file.allocate((4, 1024), torch.float32, "cpu")
        transports = TransportSet.open(cfg, kv, region_of(kv))
        try:
            assert list(transports.backends) == ["shm"] if loopback else ["shm", "rdma" if rdma_devices() else "tcp"]
            assert [o.name for o in transports.offers()] == list(transports.backends)
            assert transports.placement == Placement(this_host_id(), "cpu")
        finally:
            transports.close()
    finally:
        kv_file.close()


def test_auto_without_a_shared_file_serves_the_network_only():
    """Also on a loopback --kv-host (the default), where the network transport is the fallback."""
    kv = torch.zeros(4, 1024)
    transports = TransportSet.open(config(kv_transport="auto"), kv, region_of(kv))
    try:
        assert list(transports.backends) == ["rdma" if rdma_devices() else "tcp"]
    finally:
        transports.close()


def test_forced_shm_on_private_memory_is_refused_at_start():
    kv = torch.zeros(4, 1024)
    with pytest.raises(TransportError, match="not a /dev/shm file"):
        TransportSet.open(config(kv_transport="shm"), kv, region_of(kv))


def test_forced_nvlink_on_a_cpu_engine_is_refused_at_start():
    kv = torch.zeros(4, 1024)
    with pytest.raises(TransportError, match="--kv-transport nvlink moves cuda memory"):
        TransportSet.open(config(kv_transport="nvlink"), kv, region_of(kv))


def test_shared_kv_file_only_where_shm_is_planned():
    assert shared_kv_file(config(kv_transport="tcp"), torch.device("cpu")) is None
    assert shared_kv_file(config(kv_transport="auto"), torch.device("cuda")) is None
    assert isinstance(shared_kv_file(config(kv_transport="shm"), torch.device("cpu")), SharedKVFile)


def test_a_cache_too_large_for_the_shm_dir_falls_back_under_auto_and_is_refused_when_forced(tmp_path, monkeypatch):
    monkeypatch.setattr(SharedKVFile, "fits", staticmethod(lambda nbytes, directory: False))
    fallback = SharedKVFile(fallback=True, directory=tmp_path)
    kv = fallback.allocate((2, 8), torch.float32, "cpu")
    assert fallback.path is None and kv.shape == (2, 8) and not kv.any()
    forced = SharedKVFile(fallback=False, directory=tmp_path)
    with pytest.raises(BackendUnavailable, match="has no room for a"):
        forced.allocate((2, 8), torch.float32, "cpu")
    assert not list(tmp_path.iterdir())


class UnmappableShm(FakeTransport):
    """A same-host transport whose peer memory is not visible here (another mount namespace, say)."""

    def connect(self, peer_session: str, peer_meta: bytes) -> None:
        raise FileNotFoundError(f"{peer_session}: no such file")


def both_ranks(name: str, kv_transport: str = "auto") -> LocalRankIO:
    """A TP 1 engine's one rank serving an unmappable shm and a fake tcp transport (2 KV heads)."""
    layout = KVLayout(0, BLOCK_BYTES, 16)
    shm, tcp = UnmappableShm(f"shm://{name}"), FakeTransport(f"fake://{name}")
    for backend in (shm, tcp):
        backend.register([layout.region])
    transports = TransportSet(kv_transport, Placement("one-host", "cpu"), {"shm": shm, "tcp": tcp})
    return LocalRankIO(rank_memory(0, (0, 2), transports, layout), transports, config(kv_transport=kv_transport))


@pytest.fixture
async def side_channel():
    fp = fingerprint("m", 4)
    server = BusServer("tcp://127.0.0.1:0", KVRequest, name="kv-p0")
    handoff = PrefillHandoff("p0", LeaseTable(30.0), lambda transfer_id: asyncio.sleep(0))
    rank = both_ranks("p0")
    KVSideChannel("p0", fp, [rank.memory], rank.transports.incarnation, handoff).attach(server)
    await server.start()
    yield fp, server.endpoint
    await server.close()
    rank.close()


async def test_a_same_host_transport_that_cannot_connect_falls_back_to_the_network(side_channel):
    fp, endpoint = side_channel
    rank = both_ranks("d0")
    reader = KVReader([rank], "d0", fp, config(kv_transport="auto"), rank.transports.chosen)
    try:
        peer = await reader.peers.peer("p0", endpoint)
        assert peer.links[0, 0].transport == "tcp" and rank.transports.chosen == {"p0": "tcp"}
    finally:
        await reader.close()
        rank.close()


async def test_a_forced_transport_that_cannot_connect_fails_the_handshake_with_the_reason(side_channel):
    fp, endpoint = side_channel
    rank = both_ranks("d0", kv_transport="shm")
    reader = KVReader([rank], "d0", fp, config(kv_transport="shm"), rank.transports.chosen)
    try:
        with pytest.raises(HandshakeError, match="shm cannot connect our rank 0 to p0 rank 0: .*no such file"):
            await reader.peers.peer("p0", endpoint)
        assert rank.transports.chosen == {}
    finally:
        await reader.close()
        rank.close()


@pytest.mark.parametrize(("kv_host", "allowed"), [
    ("8.8.8.8", False), ("2001:4860:4860::8888", False),  # public: anyone reaching Mooncake could read the KV
    ("10.0.0.5", True), ("172.16.3.4", True), ("fd00::1", True), ("127.0.0.1", True), ("localhost", True),
])
def test_a_public_kv_host_needs_an_explicit_flag(kv_host, allowed):
    """Issue 15: the KV backend authenticates no one, so a public --kv-host is refused unless asked for."""
    if allowed:
        config(kv_host=kv_host)
    else:
        with pytest.raises(ConfigError, match=f"--kv-host: {kv_host} is a public address.*--kv-allow-public-host"):
            config(kv_host=kv_host)
        assert config(kv_host=kv_host, kv_allow_public_host=True).kv_host == kv_host


def test_the_push_timeout_bounds_the_lease_limit_only_in_push_mode():
    """A short lease limit with the default push timeout is a valid read-mode engine; push mode refuses it."""
    short = dict(kv_lease_seconds=1.0, kv_lease_max_seconds=2.0, kv_renew_interval_s=0.5)
    assert config(**short).kv_lease_max_seconds == 2.0
    with pytest.raises(ConfigError, match="--kv-lease-max-seconds: must be >= --kv-push-timeout-s .30. in push mode"):
        config(kv_mode="push", **short)
    with pytest.raises(ConfigError, match="must be >= --kv-lease-seconds"):
        config(**{**short, "kv_lease_seconds": 3.0})


class ThreadRecording(FakeTransport):
    """Copies up to 1 KiB inline; records the thread each copy ran on, and fails the ones told to."""

    inline_bytes = 1024

    def __init__(self, session: str):
        super().__init__(session)
        self.threads: list[int] = []
        self.raise_on_copy = False

    def transfer(self, peer_session, local_addrs, remote_addrs, lengths, *, write):
        self.threads.append(threading.get_ident())
        if self.raise_on_copy:
            raise RuntimeError("the device refused the copy")
        return super().transfer(peer_session, local_addrs, remote_addrs, lengths, write=write)


@pytest.mark.parametrize("write", [False, True])
async def test_copies_up_to_the_backend_inline_size_skip_the_thread_pool(write):
    layout = KVLayout(0, BLOCK_BYTES, 16)
    backend = ThreadRecording("fake://p0")
    backend.register([layout.region])
    transports = TransportSet("tcp", Placement("one-host", "cpu"), {"tcp": backend})
    rank = LocalRankIO(rank_memory(0, (0, 2), transports, layout), transports, config(kv_transport="tcp"))
    copy = rank.write if write else rank.read
    try:
        small, large = ByteRanges([0, 512], [0, 512], [512, 512]), ByteRanges([0], [0], [1025])
        assert (await copy("tcp", "fake://peer", small))[0] == [TransferStatus.SUCCESS] * 2
        assert backend.threads == [threading.get_ident()]  # the event loop's own thread
        assert (await copy("tcp", "fake://peer", large))[0] == [TransferStatus.SUCCESS]
        assert backend.threads[1] != threading.get_ident()  # a pool thread
        backend.raise_on_copy = True  # an inline copy that raises fails its ranges, as a pool thread's does
        assert (await copy("tcp", "fake://peer", small))[0] == [TransferStatus.FAILED] * 2
    finally:
        rank.close()
