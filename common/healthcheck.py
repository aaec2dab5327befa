"""Container health check: ``python -m common.healthcheck registry|engine ENDPOINT``.

Exits 0 when the service at ENDPOINT answers a cheap request (``ListInstances``
for the registry, ``GetStats`` for an engine) within ``--timeout`` seconds, else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from common.bus import BusClient
from common.errors import BusError
from common.messages import GetStats, ListInstances

PROBES = {"registry": ListInstances, "engine": GetStats}


async def probe(kind: str, endpoint: str, timeout: float) -> bool:
    client = BusClient(endpoint, timeout=timeout, server_role=kind)
    try:
        await client.call(PROBES[kind]())
        return True
    except BusError as e:
        print(f"{kind} at {endpoint} is not healthy: {e}", file=sys.stderr)
        return False
    finally:
        await client.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("kind", choices=sorted(PROBES))
    p.add_argument("endpoint")
    p.add_argument("--timeout", type=float, default=3.0)
    args = p.parse_args()
    sys.exit(0 if asyncio.run(probe(args.kind, args.endpoint, args.timeout)) else 1)


if __name__ == "__main__":
    main()
