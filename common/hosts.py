"""What a host name or address stands for: the addresses it resolves to, whether only this machine reaches it,
whether it is this machine's, and whether this machine can connect to it."""

from __future__ import annotations

import ipaddress
import socket

CONNECT_TIMEOUT_S = 2.0  # connect_problem's default: on one network a connection opens in milliseconds


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


def is_local(address: str) -> bool:
    """``address`` (an IP address) is one of this machine's addresses (a socket can bind it)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


def connect_problem(host: str, port: int, timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why a TCP connection from here to ``host:port`` fails within ``timeout_s`` seconds, or None when it opens
    (it is closed at once).  Blocks up to ``timeout_s``."""
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except TimeoutError:
        return f"no connection within {timeout_s:g} s"
    except OSError as e:
        return e.strerror or str(e)
    return None
