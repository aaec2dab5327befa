"""Shared-memory KV transfers between two processes, moving real KV tensors.

The peer ("prefill") is this module run as ``python -m tests.test_shm_transport SEED``:
it allocates a KV cache in a ``/dev/shm`` file (``SharedKVFile``), fills it from
``SEED``, registers it with ``ShmBackend``, prints its session, backend meta (hex)
and base address as one JSON line, and exits when its stdin closes.
"""

import json
import signal
import sys
from pathlib import Path

import msgspec
import pytest
import torch

from common.engine.kv_cache import KVCache
from common.kv_transfer.ranges import KVLayout
from common.kv_transfer.shm import SharedKVFile, SharedRegion, ShmBackend, remove_stale_files
from common.kv_transfer.status import TransferStatus
from tests.procs import PeerProcess, peer_block_ranges

GEOMETRY = dict(num_layers=4, block_size=16, num_kv_heads=2, head_dim=64, dtype=torch.float16, device="cpu")
NUM_BLOCKS = 32
SEED = 4321


def seeded(data: torch.Tensor, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    data.copy_(torch.randn(data.shape, generator=gen, dtype=torch.float32).to(data.dtype))


def serve_peer(seed: int) -> None:
    kv_file = SharedKVFile(fallback=False)
    kv = KVCache(num_blocks=NUM_BLOCKS, **GEOMETRY, allocate=kv_file.allocate)
    seeded(kv.data, seed)
    backend = ShmBackend("127.0.0.1")
    layout = KVLayout.of(kv)
    backend.register([layout.region])
    print(json.dumps({"session": backend.session, "meta": backend.backend_meta().hex(), "base": layout.base_addr}),
          flush=True)
    sys.stdin.read()  # until the test closes our stdin
    backend.close()
    kv_file.close()


def peer_files(peer: dict) -> list[Path]:
    return [Path(r.path) for r in msgspec.msgpack.decode(bytes.fromhex(peer["meta"]), type=list[SharedRegion])]


def start_peer(seed: int) -> PeerProcess:
    return PeerProcess("tests.test_shm_transport", str(seed))


@pytest.fixture(scope="module")
def peer():
    with start_peer(SEED) as info:
        yield info


@pytest.fixture(scope="module")
def local(peer):
    kv_file = SharedKVFile(fallback=False)
    kv = KVCache(num_blocks=NUM_BLOCKS, **GEOMETRY, allocate=kv_file.allocate)
    backend = ShmBackend("127.0.0.1")
    backend.register([KVLayout.of(kv).region])
    backend.connect(peer["session"], bytes.fromhex(peer["meta"]))
    yield backend, kv
    backend.close()
    kv_file.close()


def read(backend: ShmBackend, kv: KVCache, peer: dict, local_ids: list[int], remote_ids: list[int]):
    ranges = peer_block_ranges(kv, peer["base"], local_ids, remote_ids)
    return ranges, backend.read(peer["session"], *ranges)


def expected_cache() -> torch.Tensor:
    data = KVCache(num_blocks=NUM_BLOCKS, **GEOMETRY).data
    seeded(data, SEED)
    return data


def test_blocks_arrive_byte_exact_including_scattered_lists(peer, local):
    backend, kv = local
    kv.data.zero_()
    expected = expected_cache()
    remote_ids = [0, 1, 2, 3, 17, 9, 10, 31]
    local_ids = [5, 6, 7, 8, 2, 20, 21, 0]
    ranges, statuses = read(backend, kv, peer, local_ids, remote_ids)
    assert len(ranges.lengths) == 4  # [0-3]->[5-8], 17->2, [9,10]->[20,21], 31->0
    assert statuses == [TransferStatus.SUCCESS] * 4
    for lb, rb in zip(local_ids, remote_ids):
        assert torch.equal(kv.data[lb].view(torch.int16), expected[rb].view(torch.int16))
    untouched = set(range(NUM_BLOCKS)) - set(local_ids)
    assert all(not kv.data[b].any() for b in untouched)


def test_whole_cache_arrives_byte_exact(peer, local):
    backend, kv = local
    kv.data.zero_()
    ranges, statuses = read(backend, kv, peer, list(range(NUM_BLOCKS)), list(range(NUM_BLOCKS)))
    assert len(ranges.lengths) == 1 and statuses == [TransferStatus.SUCCESS]
    assert torch.equal(kv.data.view(torch.int16), expected_cache().view(torch.int16))


def test_out_of_range_reads_fail_without_touching_memory(peer, local):
    backend, kv = local
    kv.data.zero_()
    base, block, size = kv.data.data_ptr(), kv.block_bytes, kv.block_bytes * NUM_BLOCKS
    cases = [
        ([base], [peer["base"] + size - block], [2 * block]),  # runs past the end of the peer's cache
        ([base], [peer["base"] - block], [block]),  # starts before it
        ([base + size - block], [peer["base"]], [2 * block]),  # runs past the end of our cache
        ([base - block], [peer["base"]], [block]),  # starts before ours
        ([base], [4096], [block]),  # an address the peer never registered
    ]
    for local_addrs, remote_addrs, lengths in cases:
        assert backend.read(peer["session"], local_addrs, remote_addrs, lengths) == [TransferStatus.FAILED]
    assert backend.read("shm:unknown-peer", [base], [peer["base"]], [block]) == [TransferStatus.FAILED]
    assert not kv.data.any()
    # a good range next to a bad one: the good one moves, the bad one fails
    statuses = backend.read(peer["session"], [base, base + block], [peer["base"], peer["base"] + size], [block, block])
    assert statuses == [TransferStatus.SUCCESS, TransferStatus.FAILED]
    assert torch.equal(kv.data[0].view(torch.int16), expected_cache()[0].view(torch.int16))
    assert not kv.data[1:].any()


def test_push_write_lands_in_the_peers_file_byte_exact(peer, local):
    """Push mode: our blocks written into the peer process's KV file, read back through it; bad ranges fail
    and touch nothing."""
    backend, kv = local
    seeded(kv.data, SEED + 1)
    mine = kv.data.clone()
    local_ids, remote_ids = [1, 2, 30], [10, 11, 3]
    ranges = peer_block_ranges(kv, peer["base"], local_ids, remote_ids)
    assert backend.write(peer["session"], *ranges) == [TransferStatus.SUCCESS] * len(ranges.lengths)
    size, block = kv.block_bytes * NUM_BLOCKS, kv.block_bytes
    assert backend.write(peer["session"], [kv.data.data_ptr()], [peer["base"] + size], [block]) == \
        [TransferStatus.FAILED]
    assert backend.write("shm:unknown-peer", [kv.data.data_ptr()], [peer["base"]], [block]) == [TransferStatus.FAILED]
    kv.data.zero_()
    _, statuses = read(backend, kv, peer, list(range(NUM_BLOCKS)), list(range(NUM_BLOCKS)))
    assert statuses == [TransferStatus.SUCCESS]
    expected = expected_cache()
    for lb, rb in zip(local_ids, remote_ids):
        expected[rb] = mine[lb]
    assert torch.equal(kv.data.view(torch.int16), expected.view(torch.int16))
    backend.write(peer["session"], *peer_block_ranges(kv, peer["base"], list(range(NUM_BLOCKS)),
                                                       list(range(NUM_BLOCKS))))  # the peer's cache as it was
    kv.data.copy_(expected_cache())


def test_a_killed_owners_file_is_removed_as_stale(peer):
    owner = start_peer(SEED + 1)
    with owner as info:  # stopped (reaped) on the way out, whatever fails
        files = peer_files(info)
        assert files and all(f.exists() for f in files)
        owner.proc.send_signal(signal.SIGKILL)
    removed = remove_stale_files()  # the owner is reaped: its pid no longer names a live process
    assert {f.name for f in files} <= set(removed)
    assert not any(f.exists() for f in files)
    assert all(f.exists() for f in peer_files(peer))  # a live owner's file stays


def test_owner_removes_its_file_at_close():
    owner = start_peer(SEED + 2)
    with owner as info:
        files = peer_files(info)
        assert all(f.exists() for f in files)
    assert owner.proc.returncode == 0
    assert not any(f.exists() for f in files)


if __name__ == "__main__":
    serve_peer(int(sys.argv[1]))
