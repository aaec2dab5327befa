"""KV transfer between engines: backends, block ranges, statuses, leases, the connector."""

from common.kv_transfer.backend import BackendUnavailable, TransferBackend, make_backend
from common.kv_transfer.config import KVTransferConfig
from common.kv_transfer.connector import ConnectorMetrics, KVConnector, KVSideChannel, ReadStats
from common.kv_transfer.leases import LeaseTable
from common.kv_transfer.ranges import ByteRanges, KVLayout, block_ranges
from common.kv_transfer.status import RequestTransfers, TransferStatus, aggregate

__all__ = [
    "BackendUnavailable",
    "ByteRanges",
    "ConnectorMetrics",
    "KVConnector",
    "KVLayout",
    "KVSideChannel",
    "KVTransferConfig",
    "LeaseTable",
    "ReadStats",
    "RequestTransfers",
    "TransferBackend",
    "TransferStatus",
    "aggregate",
    "block_ranges",
    "make_backend",
]
