"""Which transport moves a prompt's KV between two engines: planned at start, chosen per peer.

The transports (``--kv-transport``), fastest first:

* ``nvlink``: both engines keep KV in GPU memory on one host.  The reader maps
  the prefill's KV allocation through CUDA IPC and copies device to device
  (over NVLink between two GPUs, within HBM on one GPU): ``cuda_ipc.py``.
* ``shm``: both keep KV in host memory on one host.  The prefill's KV cache is a
  file in ``/dev/shm`` the reader maps; a read is a ``memcpy``: ``shm.py``.
* ``rdma`` / ``tcp``: the network backend (``--kv-backend``: Mooncake or
  MoRI-IO) over RDMA NICs, or over TCP (which stages GPU memory through host
  memory inside the backend).

At start an engine opens the transports it can serve (``plan``): with ``auto``
the same-host one for its memory kind plus the network one (RDMA where NICs
exist, else TCP) — except with a loopback ``--kv-host``, where no other host
could reach the network one and the installed Mooncake would listen on every
interface for it (it has no bind address): there it is opened only if the
same-host one cannot be (``fallback``).  A forced transport that cannot work here is refused with
``TransportError`` before the engine registers.  Each handshake carries both
sides' ``Placement`` and offers, and the reader tries ``candidates`` in order:
the same-host transport when host and memory kind match, then the network one.
A forced transport the peer cannot meet fails the handshake with the reason.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.config import ConfigError

TRANSPORT_CHOICES = ("auto", "nvlink", "shm", "rdma", "tcp")
SAME_HOST = {"cuda": "nvlink", "cpu": "shm"}  # memory kind -> its same-host transport
NETWORK = ("rdma", "tcp")


class TransportError(ConfigError):
    """A transport that cannot work between these engines (or on this one); the message says why.
    At start it is a configuration error (one line, exit status 2)."""


@dataclass(frozen=True)
class Placement:
    """Where an engine's KV lives: the host (hostname + boot id) and the memory kind."""

    host_id: str
    memory: str  # "cpu" or "cuda"


def this_host_id() -> str:
    """Names this boot of this machine: two engines with equal ids can share memory."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    return f"{socket.gethostname()}/{boot.read_text().strip() if boot.exists() else 'no-boot-id'}"


def rdma_devices() -> list[str]:
    """RDMA NICs of this host (``/sys/class/infiniband``)."""
    root = Path("/sys/class/infiniband")
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


@dataclass(frozen=True)
class TransportPlan:
    """What an engine opens: its same-host transport (or None), its network transport (or None), and
    the network transport it opens only when the same-host one cannot be opened (or None)."""

    same_host: str | None
    network: str | None
    fallback: str | None = None

    @property
    def names(self) -> list[str]:
        return [t for t in (self.same_host, self.network) if t is not None]


def plan(kv_transport: str, memory: str, has_rdma: bool, loopback_only: bool = False) -> TransportPlan:
    """The transports an engine with KV in ``memory`` serves under ``--kv-transport kv_transport``;
    ``loopback_only``: its ``--kv-host`` is a loopback address.

    Raises ``TransportError`` for a forced transport this engine cannot serve.
    """
    if kv_transport not in TRANSPORT_CHOICES:
        raise TransportError(f"unknown KV transport {kv_transport!r} (one of {', '.join(TRANSPORT_CHOICES)})")
    network = "rdma" if has_rdma else "tcp"
    if kv_transport == "auto":
        if loopback_only:
            return TransportPlan(SAME_HOST[memory], None, fallback=network)
        return TransportPlan(SAME_HOST[memory], network)
    if kv_transport in NETWORK:
        if kv_transport == "rdma" and not has_rdma:
            raise TransportError("--kv-transport rdma: this host has no RDMA devices (/sys/class/infiniband is empty)")
        return TransportPlan(None, kv_transport)
    if SAME_HOST[memory] != kv_transport:
        wanted = next(m for m, t in SAME_HOST.items() if t == kv_transport)
        raise TransportError(f"--kv-transport {kv_transport} moves {wanted} memory; this engine's KV is in {memory} "
                             f"memory (use --kv-transport {SAME_HOST[memory]} or auto)")
    return TransportPlan(kv_transport, None)


def candidates(kv_transport: str, ours: Placement, peer: Placement, our_offers: Sequence[str],
               peer_offers: Sequence[str]) -> list[str]:
    """The transports to try with ``peer``, in order (at least one).

    Raises ``TransportError`` when none can work, naming what each side offers.
    """
    local = SAME_HOST[ours.memory] if ours == peer else None  # same host and same memory kind
    wanted = [kv_transport] if kv_transport != "auto" else [t for t in (local, "rdma", "tcp") if t is not None]
    usable = [t for t in wanted if t in our_offers and t in peer_offers and (t in NETWORK or t == local)]
    if usable:
        return usable
    why = ""
    if kv_transport in SAME_HOST.values() and kv_transport != local:
        why = (f"; {kv_transport} needs both engines on one host with KV in "
               f"{next(m for m, t in SAME_HOST.items() if t == kv_transport)} memory "
               f"(we are {ours.host_id} {ours.memory}, the peer {peer.host_id} {peer.memory})")
    raise TransportError(f"no common KV transport ({'forced ' + kv_transport if kv_transport != 'auto' else 'auto'}): "
                         f"we offer {', '.join(our_offers) or 'none'}, the peer offers "
                         f"{', '.join(peer_offers) or 'none'}{why}")
