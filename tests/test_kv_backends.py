"""L1: the MoRI-IO backend against the fake ``mori.io`` (real memcpy), and the backend factory."""

import importlib
import sys
import time

import pytest
import torch

from common.kv_transfer.backend import BACKENDS, BackendUnavailable, TransferBackend, make_backend
from common.kv_transfer.mori import MoriBackend
from common.kv_transfer.status import TransferStatus
from common.messages import MemoryRegion
from tests.fakes import mori as fake_mori

S, F = TransferStatus.SUCCESS, TransferStatus.FAILED
NBYTES = 4096


HOST_KV = torch.empty(0, dtype=torch.uint8)  # what a backend learns the memory kind from: host memory


def region(t: torch.Tensor) -> MemoryRegion:
    return MemoryRegion(t.data_ptr(), t.numel() * t.element_size())


@pytest.fixture
def fake():
    yield fake_mori.install()
    fake_mori.uninstall()


@pytest.fixture
def pair(fake):
    """(prefill backend, its two buffers, decode backend, its buffer); decode is connected to prefill."""
    src = [torch.randint(0, 256, (NBYTES,), dtype=torch.uint8) for _ in range(2)]
    dst = torch.zeros(2 * NBYTES, dtype=torch.uint8)
    prefill = make_backend("mori", "127.0.0.1", HOST_KV, transport="rdma")
    decode = make_backend("mori", "127.0.0.1", HOST_KV, transport="tcp")
    prefill.register([region(t) for t in src])
    decode.register([region(dst)])
    decode.connect(prefill.session, prefill.backend_meta())
    yield prefill, src, decode, dst
    decode.close()
    prefill.close()


def test_read_moves_bytes_across_regions(pair):
    prefill, src, decode, dst = pair
    base = dst.data_ptr()
    statuses = decode.read(
        prefill.session,
        [base, base + 100, base + NBYTES],
        [src[0].data_ptr() + 10, src[1].data_ptr(), src[1].data_ptr() + 1000],
        [50, 300, NBYTES - 1000],
    )
    assert statuses == [S, S, S]
    assert torch.equal(dst[:50], src[0][10:60])
    assert torch.equal(dst[100:400], src[1][:300])
    assert torch.equal(dst[NBYTES:2 * NBYTES - 1000], src[1][1000:])
    assert not dst[50:100].any() and not dst[2 * NBYTES - 1000:].any()  # nothing else written


def test_push_write_moves_bytes_into_the_peer(pair):
    prefill, src, decode, dst = pair  # decode's buffer is the one written from here
    dst.copy_(torch.randint(0, 256, (2 * NBYTES,), dtype=torch.uint8))
    before = [t.clone() for t in src]
    base = dst.data_ptr()
    statuses = decode.write(prefill.session, [base, base + NBYTES], [src[0].data_ptr() + 8, src[1].data_ptr()],
                            [100, 200])
    assert statuses == [S, S]
    assert torch.equal(src[0][8:108], dst[:100]) and torch.equal(src[1][:200], dst[NBYTES:NBYTES + 200])
    assert torch.equal(src[0][108:], before[0][108:]) and torch.equal(src[1][200:], before[1][200:])


def test_read_past_a_region_end_is_rejected(pair):
    prefill, src, decode, dst = pair
    with pytest.raises(ValueError, match="remote range"):
        decode.read(prefill.session, [dst.data_ptr()], [src[0].data_ptr() + NBYTES - 10], [20])


def test_injected_failure_fails_only_its_batch(pair, fake):
    prefill, src, decode, dst = pair
    base = dst.data_ptr()
    fake.knobs.fail_next = 1
    # two batches: (local 0, remote 0) and (local 0, remote 1); the first one submitted fails
    statuses = decode.read(prefill.session, [base, base + 10], [src[0].data_ptr(), src[1].data_ptr()], [10, 10])
    assert statuses == [F, S]
    assert torch.equal(dst[10:20], src[1][:10])
    assert decode.read(prefill.session, [base], [src[0].data_ptr()], [10]) == [S]


def test_slow_transfer_blocks_until_done(pair, fake):
    prefill, src, decode, dst = pair
    fake.knobs.delay_s = 0.2
    start = time.perf_counter()
    assert decode.read(prefill.session, [dst.data_ptr()], [src[0].data_ptr()], [NBYTES]) == [S]
    assert time.perf_counter() - start >= 0.2
    assert torch.equal(dst[:NBYTES], src[0])


def test_read_past_its_timeout_fails(pair, fake):
    prefill, src, _, dst = pair
    impatient = make_backend("mori", "127.0.0.1", HOST_KV, transport="rdma", read_timeout_s=0.1)
    try:
        impatient.register([region(dst)])
        impatient.connect(prefill.session, prefill.backend_meta())
        fake.knobs.delay_s = 1.0
        start = time.perf_counter()
        assert impatient.read(prefill.session, [dst.data_ptr()], [src[0].data_ptr()], [NBYTES]) == [F]
        assert time.perf_counter() - start < 0.9
    finally:
        fake.knobs.delay_s = 0.0
        time.sleep(1.0)  # the late transfer lands before its buffers go away
        impatient.close()


def test_read_after_peer_closed_fails(pair):
    prefill, src, decode, dst = pair
    prefill.close()
    assert decode.read(prefill.session, [dst.data_ptr()], [src[0].data_ptr()], [16]) == [F]


def test_unknown_peer_and_bad_arguments(pair):
    prefill, src, decode, dst = pair
    with pytest.raises(ValueError, match="not connected"):
        decode.read("nobody", [dst.data_ptr()], [src[0].data_ptr()], [16])
    with pytest.raises(ValueError, match="differ in length"):
        decode.read(prefill.session, [dst.data_ptr()], [], [16])
    with pytest.raises(ValueError, match="> 0"):
        decode.read(prefill.session, [dst.data_ptr()], [src[0].data_ptr()], [0])
    assert decode.read(prefill.session, [], [], []) == []


def test_connect_checks_metadata(pair):
    prefill, src, decode, dst = pair
    with pytest.raises(ValueError, match="bad MoRI-IO metadata"):
        decode.connect("other", b"\x01garbage")
    with pytest.raises(ValueError, match="not 'other'"):
        decode.connect("other", prefill.backend_meta())
    decode.connect(prefill.session, prefill.backend_meta())  # idempotent


def test_register_once(fake):
    b = MoriBackend("127.0.0.1")
    t = torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="register memory before"):
        b.backend_meta()
    with pytest.raises(ValueError, match="no memory regions"):
        b.register([])
    b.register([region(t)])
    with pytest.raises(RuntimeError, match="once"):
        b.register([region(t)])
    b.close()
    b.close()


def test_mori_without_the_library_names_the_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "mori", None)
    monkeypatch.setitem(sys.modules, "mori.io", None)
    with pytest.raises(BackendUnavailable, match="ROCm/mori"):
        make_backend("mori", "127.0.0.1", HOST_KV, transport="rdma")


def test_unknown_backend_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=(r"unknown KV transfer backend .nixl. "
                                        r"\(known: mooncake, mori, nvlink, shm\)")):
        make_backend("nixl", "127.0.0.1", HOST_KV, transport="tcp")


def test_registry_entries_name_their_backend_classes():
    for name, target in BACKENDS.items():
        module_name, class_name = target.split(":")
        backend_class = getattr(importlib.import_module(module_name), class_name)
        assert issubclass(backend_class, TransferBackend) and backend_class.name == name


def test_mooncake_backend_registers_and_reads_locally():
    """One in-process Mooncake engine reading from itself over TCP (the 2-process test is separate)."""
    backend = make_backend("mooncake", "127.0.0.1", HOST_KV, transport="tcp")
    try:
        buf = torch.zeros(2 * NBYTES, dtype=torch.uint8)
        buf[NBYTES:] = torch.randint(0, 256, (NBYTES,), dtype=torch.uint8)
        backend.register([region(buf)])
        assert backend.session.startswith("127.0.0.1:")
        base = buf.data_ptr()
        assert backend.read(backend.session, [base], [base + NBYTES], [NBYTES]) == [S]
        assert torch.equal(buf[:NBYTES], buf[NBYTES:])
    finally:
        backend.close()


def test_mooncake_missing_names_the_fix(monkeypatch):
    from common.kv_transfer import mooncake

    monkeypatch.setitem(sys.modules, "mooncake.engine", None)
    builds = r"pip install -e '\.\[cpu\]'.*pip install -e '\.\[cuda12\]'.*pip install -e '\.\[cuda13\]'"
    with pytest.raises(BackendUnavailable, match=builds + ".* libibverbs1 librdmacm1 libnuma1 libcurl4"):
        mooncake.load_transfer_engine_class()
