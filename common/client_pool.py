"""One bus client per endpoint, made on first use and closed with the pool.

Every process that calls many peers (the gateway to engines, decode to prefill
side channels, the test drivers) keeps its DEALERs here instead of a dict of
its own.  A client whose peer left is dropped: its pending calls fail with
``PeerGone`` and the next ``get`` connects afresh.
"""

from __future__ import annotations

from common.bus import DEFAULT_MAX_FRAME_BYTES, BusClient
from common.tasks import BackgroundTasks


class ClientPool:
    """endpoint -> ``BusClient``; ``timeout`` is each client's default call timeout."""

    def __init__(self, *, name: str, timeout: float, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        self.name = name
        self.timeout = timeout
        self.max_frame_bytes = max_frame_bytes
        self._clients: dict[str, BusClient] = {}
        self._closing = BackgroundTasks()

    def __contains__(self, endpoint: str) -> bool:
        return endpoint in self._clients

    def get(self, endpoint: str) -> BusClient:
        """The pool's client of ``endpoint``, connecting on first use."""
        client = self._clients.get(endpoint)
        if client is None:
            client = BusClient(endpoint, name=f"{self.name}->{endpoint}", timeout=self.timeout,
                               max_frame_bytes=self.max_frame_bytes)
            self._clients[endpoint] = client
        return client

    def drop(self, endpoint: str, client: BusClient | None = None) -> None:
        """Close ``endpoint``'s client in the background (its pending calls fail with ``PeerGone``);
        given ``client``, only while it is still the pool's one (a failed call drops no newer client)."""
        if client is not None and self._clients.get(endpoint) is not client:
            return
        client = self._clients.pop(endpoint, None)
        if client is not None:
            self._closing.spawn(client.close())

    async def close(self) -> None:
        """Close every client, including those still closing from ``drop``."""
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            self._closing.spawn(client.close())
        await self._closing.wait()
