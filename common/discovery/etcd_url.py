"""``etcd://HOST:PORT[,HOST:PORT...][/PREFIX][?lease_ttl_s=N]``: where the etcd cluster is, and our keys in it.

Every instance is the key ``PREFIX/instances/<instance id>`` (default prefix
``/pdserve``), attached to an etcd lease of ``lease_ttl_s`` seconds (a whole
number: etcd counts lease TTLs in seconds; default 3, as the ZMQ registry's).
Engines heartbeat every third of it.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

SCHEME = "etcd://"
HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[^\s:/\[\]]+):(\d{1,5})$")


@dataclass(frozen=True, slots=True)
class EtcdURL:
    endpoints: tuple[tuple[str, int], ...]  # cluster members' client addresses, tried in turn
    prefix: str = "/pdserve"
    lease_ttl_s: int = 3

    @property
    def instances_prefix(self) -> bytes:
        return f"{self.prefix}/instances/".encode()

    def key(self, instance_id: str) -> bytes:
        return self.instances_prefix + instance_id.encode()

    @property
    def heartbeat_interval_s(self) -> float:
        return self.lease_ttl_s / 3

    @classmethod
    def parse(cls, url: str) -> EtcdURL:
        """The URL's parts; ``ValueError`` saying what is wrong."""
        if not url.startswith(SCHEME):
            raise ValueError(f"{url!r} is not an etcd URL (etcd://host:port[,host:port...])")
        rest, _, query = url[len(SCHEME):].partition("?")
        hosts, slash, path = rest.partition("/")
        endpoints = []
        for part in hosts.split(","):
            match = HOST_PORT.match(part)
            if not match or not 0 < int(match[2]) < 65536:
                raise ValueError(f"{url!r}: {part!r} is not host:port")
            endpoints.append((match[1].strip("[]"), int(match[2])))
        prefix = "/" + path.strip("/") if slash and path.strip("/") else "/pdserve"
        options = urllib.parse.parse_qs(query, strict_parsing=bool(query))
        unknown = set(options) - {"lease_ttl_s"}
        if unknown:
            raise ValueError(f"{url!r}: unknown option {', '.join(sorted(unknown))} (known: lease_ttl_s)")
        ttl = options.get("lease_ttl_s", ["3"])[-1]
        if not ttl.isdigit() or int(ttl) < 1:
            raise ValueError(f"{url!r}: lease_ttl_s must be a whole number of seconds >= 1, got {ttl!r}")
        return cls(tuple(endpoints), prefix, int(ttl))
