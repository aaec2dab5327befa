"""KV transfer settings shared by prefill and decode engines (flags ``--kv-*``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from common.config import opt, require
from common.hosts import is_public
from common.kv_transfer.transports import TransportError, forced


@dataclass
class KVTransferConfig:
    kv_backend: Literal["mooncake", "mori"] = opt("mooncake", "KV transfer backend", choices=("mooncake", "mori"))
    kv_host: str = opt("127.0.0.1", "address peers reach this engine's transfer backend at")
    kv_allow_public_host: bool = opt(False, "let --kv-host be a public address: anyone who reaches the KV "
                                            "backend's ports can read and write the KV cache (Mooncake "
                                            "authenticates no one), so keep them on a private network")
    kv_transport: str = opt(
        "auto", "how KV moves: auto picks per peer (nvlink: GPUs of one host, shm: host memory of one host, "
        "rdma where NICs exist, else tcp; with a loopback --kv-host only the same-host one); a forced one "
        "(or a same-host and a network one: shm,tcp) that cannot work is refused")
    kv_mode: Literal["read", "push"] = opt(
        "read", "read: decode reads the prompt's KV from prefill after prefill finished; push: decode "
        "pre-allocates the blocks and prefill writes the KV into them as it computes (every engine and "
        "the gateway of one model use the same mode)", choices=("read", "push"))
    kv_push_timeout_s: float = opt(30.0, "push mode, decode: free a request's pre-allocated blocks when no "
                                         "prefill confirmed or finished writing them for this long")
    kv_lease_seconds: float = opt(30.0, "prefill frees pinned blocks this long after the last renewal")
    kv_lease_max_seconds: float = opt(300.0, "prefill frees pinned blocks this long after pinning them, "
                                             "however often their reader renews")
    kv_max_pinned_blocks_per_peer: int = opt(0, "prefill refuses the prefill legs of a peer that holds this many "
                                                "pinned blocks (0: no cap)")
    kv_lease_sweep_interval_s: float = opt(1.0, "how often prefill looks for expired leases")
    kv_handshake_timeout_s: float = opt(5.0, "give up a handshake with a prefill engine after this long")
    kv_rpc_timeout_s: float = opt(5.0, "timeout of RenewLease / ReleaseKV calls")
    kv_read_timeout_s: int = opt(30, "a backend read of one request's blocks fails after this many seconds")
    kv_renew_interval_s: float = opt(5.0, "renew a lease this often while its blocks are being read")
    kv_transfer_threads: int = opt(4, "threads running blocking backend reads")
    kv_read_shards: int = opt(0, "split one request's read into this many concurrent backend batches "
                                 "(0: what the transport does best: 2 for shm, 1 for the others)")

    def validate(self) -> None:
        require(bool(self.kv_host), "kv_host", "must not be empty")
        try:
            forced(self.kv_transport)
        except TransportError as e:
            require(False, "kv_transport", str(e))
        require(self.kv_allow_public_host or not is_public(self.kv_host), "kv_host",
                f"{self.kv_host} is a public address, and the KV backend lets anyone who reaches its ports read "
                "and write the KV cache: use a private-network address, or --kv-allow-public-host if you mean it")
        for name in (
            "kv_lease_seconds",
            "kv_push_timeout_s",
            "kv_lease_sweep_interval_s",
            "kv_handshake_timeout_s",
            "kv_rpc_timeout_s",
            "kv_renew_interval_s",
            "kv_read_timeout_s",
        ):
            require(getattr(self, name) > 0, name, "must be > 0")
        require(self.kv_lease_max_seconds >= self.kv_lease_seconds, "kv_lease_max_seconds",
                f"must be >= --kv-lease-seconds ({self.kv_lease_seconds:g})")
        require(self.kv_mode == "read" or self.kv_lease_max_seconds >= self.kv_push_timeout_s,
                "kv_lease_max_seconds", f"must be >= --kv-push-timeout-s ({self.kv_push_timeout_s:g}) in push mode")
        require(
            self.kv_renew_interval_s < self.kv_lease_seconds,
            "kv_renew_interval_s",
            f"must be < --kv-lease-seconds ({self.kv_lease_seconds:g}) or leases expire mid-read",
        )
        require(self.kv_max_pinned_blocks_per_peer >= 0, "kv_max_pinned_blocks_per_peer", "must be >= 0")
        require(self.kv_transfer_threads >= 1, "kv_transfer_threads", "must be >= 1")
        require(self.kv_read_shards >= 0, "kv_read_shards", "must be >= 0")
        require(
            self.kv_read_shards <= self.kv_transfer_threads,
            "kv_read_shards",
            f"must be <= --kv-transfer-threads ({self.kv_transfer_threads})",
        )
