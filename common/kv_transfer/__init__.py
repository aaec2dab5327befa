"""KV transfer between engines: backends, block ranges, statuses, leases, the reader and the side channel."""

from common.kv_transfer.backend import BackendUnavailable, TransferBackend, make_backend
from common.kv_transfer.config import KVTransferConfig
from common.kv_transfer.leases import LeaseTable
from common.kv_transfer.ranges import BlockTable, ByteRanges, KVLayout, token_ranges
from common.kv_transfer.reader import KVReader, ReadStats, ReleaseSender
from common.kv_transfer.side_channel import KVSideChannel, PinnedTransfers
from common.kv_transfer.status import TransferQuorum, TransferStatus, aggregate

__all__ = [
    "BackendUnavailable",
    "BlockTable",
    "ByteRanges",
    "KVLayout",
    "KVReader",
    "KVSideChannel",
    "KVTransferConfig",
    "LeaseTable",
    "PinnedTransfers",
    "ReadStats",
    "ReleaseSender",
    "TransferBackend",
    "TransferQuorum",
    "TransferStatus",
    "aggregate",
    "make_backend",
    "token_ranges",
]
