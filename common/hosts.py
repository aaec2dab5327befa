"""What a host name or address stands for: the addresses it resolves to, and whether only this machine reaches it."""

from __future__ import annotations

import ipaddress
import socket


def resolve(host: str) -> list[str]:
    """The IP addresses ``host`` resolves to (none when it does not)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_loopback(host: str) -> bool:
    """``host`` resolves to loopback addresses only (a name that does not resolve is not loopback)."""
    addresses = resolve(host)
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def is_public(host: str) -> bool:
    """``host`` resolves to at least one globally routable address (not private, loopback or reserved)."""
    return any(ipaddress.ip_address(a.split("%")[0]).is_global for a in resolve(host))
