"""Where an engine binds, given the host it advertises (``--advertise-host``).

Peers connect to the advertised host, so the sockets must listen on an address that host
reaches.  Unset binds follow the advertised host (``bind_host``); a bind that peers could not
reach through the advertised host is refused (``check_reachable``).  An advertised host that is not
this machine's is a NAT address or a mistake: ``advertised_problem`` tells them apart where it can.
"""

from __future__ import annotations

from common.hosts import connect_problem, is_local, is_loopback, resolve

WILDCARDS = ("0.0.0.0", "*", "::", "[::]")


def bind_host(advertise_host: str) -> str:
    """The address to bind for ``advertise_host``: the first address it resolves to that belongs to
    this machine, else ``0.0.0.0`` (the advertised host is a NAT or load-balancer address)."""
    for address in resolve(advertise_host):
        if is_local(address):
            return f"[{address}]" if ":" in address else address
    return "0.0.0.0"


def tcp_host(endpoint: str) -> str | None:
    """The host of a ``tcp://host:port`` endpoint (None for ``ipc://``)."""
    if not endpoint.startswith("tcp://"):
        return None
    return endpoint[len("tcp://"):].rsplit(":", 1)[0]


def check_reachable(bound: str, advertise_host: str) -> str | None:
    """Why peers told to connect to ``advertise_host`` could not reach a socket bound at ``bound``
    (a host or a ``tcp://`` endpoint), or None when they can."""
    host = tcp_host(bound) if bound.startswith(("tcp://", "ipc://")) else bound
    if host is None or host in WILDCARDS:
        return None
    host = host.strip("[]")
    if is_loopback(host) and not is_loopback(advertise_host):
        return (f"{bound} is loopback only, but --advertise-host {advertise_host} tells other hosts to connect "
                f"to this engine: give an address they reach, or leave it unset to follow --advertise-host")
    if not is_loopback(host) and is_loopback(advertise_host):
        return (f"{bound} is not loopback, but --advertise-host {advertise_host} tells peers to connect on "
                f"loopback; give --advertise-host {host}")
    return None


def advertised_problem(endpoint: str) -> str | None:
    """Why this host cannot connect to its own advertised ``tcp://host:port`` (a wrong ``--advertise-host``
    rather than a NAT address that forwards here), or None.  Blocks up to ``hosts.CONNECT_TIMEOUT_S``."""
    host, port = endpoint[len("tcp://"):].rsplit(":", 1)
    return connect_problem(host.strip("[]"), int(port))
