"""Mooncake over TCP between two processes on loopback, moving real KV tensors.

The peer ("prefill") is this module run as ``python -m tests.test_mooncake_loopback SEED``:
it fills a KV cache from ``SEED``, registers it, prints its session and base
address as one JSON line, and exits when its stdin closes.
"""

import json
import sys

import pytest
import torch

from common.engine.kv_cache import KVCache
from common.kv_transfer.mooncake import MooncakeBackend
from common.kv_transfer.ranges import KVLayout
from common.kv_transfer.status import TransferStatus
from tests.procs import PeerProcess, peer_block_ranges

GEOMETRY = dict(num_layers=4, block_size=16, num_kv_heads=2, head_dim=64, dtype=torch.float16, device="cpu")
NUM_BLOCKS = 32
SEED = 1234


def seeded_cache(seed: int) -> KVCache:
    kv = KVCache(num_blocks=NUM_BLOCKS, **GEOMETRY)
    gen = torch.Generator().manual_seed(seed)
    kv.data.copy_(torch.randn(kv.data.shape, generator=gen, dtype=torch.float32).to(kv.data.dtype))
    return kv


def serve_peer(seed: int) -> None:
    kv = seeded_cache(seed)
    backend = MooncakeBackend("127.0.0.1", force_tcp=True)
    layout = KVLayout.of(kv)
    backend.register([layout.region])
    print(json.dumps({"session": backend.session, "base": layout.base_addr}), flush=True)
    sys.stdin.read()  # until the test closes our stdin
    backend.close()


@pytest.fixture(scope="module")
def peer():
    with PeerProcess("tests.test_mooncake_loopback", str(SEED)) as info:
        yield info


@pytest.fixture(scope="module")
def local():
    kv = KVCache(num_blocks=NUM_BLOCKS, **GEOMETRY)
    backend = MooncakeBackend("127.0.0.1", force_tcp=True)
    backend.register([KVLayout.of(kv).region])
    yield backend, kv
    backend.close()


def read(backend, kv, peer, local_ids, remote_ids):
    ranges = peer_block_ranges(kv, peer["base"], local_ids, remote_ids)
    return ranges, backend.read(peer["session"], *ranges)


def test_blocks_arrive_byte_exact_including_scattered_lists(peer, local):
    backend, kv = local
    expected = seeded_cache(SEED)
    remote_ids = [0, 1, 2, 3, 17, 9, 10, 31]
    local_ids = [5, 6, 7, 8, 2, 20, 21, 0]
    ranges, statuses = read(backend, kv, peer, local_ids, remote_ids)
    assert len(ranges.lengths) == 4  # [0-3]->[5-8], 17->2, [9,10]->[20,21], 31->0
    assert statuses == [TransferStatus.SUCCESS] * 4
    for l, r in zip(local_ids, remote_ids):
        assert torch.equal(kv.data[l].view(torch.int16), expected.data[r].view(torch.int16))
    untouched = set(range(NUM_BLOCKS)) - set(local_ids)
    assert all(not kv.data[b].any() for b in untouched)


def test_read_of_unregistered_remote_memory_fails(peer, local):
    """An unmapped remote address fails the batch.

    Mooncake's TCP transport does not check remote addresses against the
    peer's registrations (a mapped but unregistered address reads fine), which
    is why the connector bounds every block id by the peer's handshake geometry.
    """
    backend, kv = local
    unmapped = 4096  # the zero page: never mapped in the peer
    statuses = backend.read(peer["session"], [kv.data.data_ptr(), kv.data.data_ptr() + kv.block_bytes],
                            [peer["base"], unmapped], [kv.block_bytes, kv.block_bytes])
    assert statuses == [TransferStatus.FAILED, TransferStatus.FAILED]


def test_push_write_lands_in_the_peers_blocks_byte_exact(peer, local):
    """Push mode: our blocks written into the peer's (real TCP write), then read back from there."""
    backend, kv = local
    mine = seeded_cache(SEED + 1)
    kv.data.copy_(mine.data)
    local_ids, remote_ids = [3, 4, 9], [20, 21, 7]
    ranges = peer_block_ranges(kv, peer["base"], local_ids, remote_ids)
    assert backend.write(peer["session"], *ranges) == [TransferStatus.SUCCESS] * len(ranges.lengths)
    kv.data.zero_()
    _, statuses = read(backend, kv, peer, local_ids, remote_ids)
    assert statuses == [TransferStatus.SUCCESS] * len(statuses)
    for l in local_ids:
        assert torch.equal(kv.data[l].view(torch.int16), mine.data[l].view(torch.int16))


def test_push_write_to_unregistered_remote_memory_fails(peer, local):
    backend, kv = local
    assert backend.write(peer["session"], [kv.data.data_ptr()], [4096], [kv.block_bytes]) == [TransferStatus.FAILED]


if __name__ == "__main__":
    serve_peer(int(sys.argv[1]))
