"""The endpoints a bus client may dial: ``tcp://host:port`` or ``ipc://path``, checked before any socket exists.

Every dialer (``BusClient``, and so ``ClientPool``, the registry client and the
KV side-channel clients) checks its endpoint here, so an endpoint from the
network (``KVTransferParams.kv_endpoint``) that is not one is refused with
``BadEndpoint`` instead of reaching libzmq, which would fail with ``EINVAL``
or, worse, dial a port that cannot exist.
"""

from __future__ import annotations

import re

from common.errors import BusError

# A DNS name or IPv4 address, or an IPv6 address in brackets; then a port.
_TCP = re.compile(r"tcp://(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]{2,45}\]):([0-9]{1,5})")
_IPC = re.compile(r"ipc://[^\x00-\x1f]{1,107}")  # a socket path (sun_path holds 107 bytes and a NUL)


class BadEndpoint(BusError, ValueError):
    """An endpoint that is not ``tcp://host:port`` (port 1-65535) or ``ipc://path``."""


def endpoint_problem(endpoint: object) -> str | None:
    """Why ``endpoint`` cannot be dialed, or None when it is ``tcp://host:port`` or ``ipc://path``."""
    if not isinstance(endpoint, str):
        return f"an endpoint is a string, got {type(endpoint).__name__}"
    tcp = _TCP.fullmatch(endpoint)
    if tcp is not None:
        return None if 0 < int(tcp.group(1)) < 65536 else f"{endpoint[:100]!r}: port outside 1-65535"
    if _IPC.fullmatch(endpoint):
        return None
    return f"{endpoint[:100]!r} is not tcp://host:port or ipc://path"


def check_endpoint(endpoint: str) -> str:
    """``endpoint`` when it can be dialed; raises ``BadEndpoint`` otherwise."""
    problem = endpoint_problem(endpoint)
    if problem is not None:
        raise BadEndpoint(problem)
    return endpoint
