"""Fake engines with a real registry (and a real gateway, for ``FakeCluster``) in one event loop."""

from __future__ import annotations

import asyncio

from bench.fakes.engine import FakeEngine
from common.messages import Role
from services.registry.server import Registry, RegistryConfig


async def run_fakes(registry: str, *, prefill: int = 1, decode: int = 1, both: int = 0, model: str = "fake",
                    **kwargs) -> list[FakeEngine]:
    """Start and register fake engines of each role."""
    engines = [FakeEngine(role, registry, model=model, **kwargs)
               for role, count in (("prefill", prefill), ("decode", decode), ("both", both)) for _ in range(count)]
    for e in engines:
        await e.start()
    return engines


class FakeCluster:
    """A real registry, fake engines and a real gateway, all in the running event loop.

    ``async with FakeCluster(prefill=2, gateway={"max_retries": 1}) as c:`` then
    ``c.url`` is the gateway's base URL and ``c.engines`` the fake engines.  The registry's lease
    is long by default, so that a loaded machine never expires a live fake; a test of expiry passes
    a short ``lease_ttl_s``.  With ``discovery`` (an ``etcd://`` URL) no registry is started: engines
    and gateway use that discovery.
    """

    def __init__(self, *, prefill: int = 1, decode: int = 1, both: int = 0, gateway: dict | None = None,
                 heartbeat_interval_s: float = 0.1, lease_ttl_s: float = 10.0, discovery: str | None = None,
                 **engine_kwargs):
        self.roles = {"prefill": prefill, "decode": decode, "both": both}
        self.gateway_overrides = gateway or {}
        self.registry_config = RegistryConfig(bind="tcp://127.0.0.1:0", heartbeat_interval_s=heartbeat_interval_s,
                                              lease_ttl_s=lease_ttl_s)
        self.engine_kwargs = engine_kwargs
        self.discovery = discovery
        self.registry: Registry | None = None
        self.engines: list[FakeEngine] = []
        self.url = ""
        self._gateway: asyncio.Task | None = None

    @property
    def discovery_url(self) -> str:
        """What the engines register with and the gateway watches."""
        return self.discovery or self.registry_config.bind

    def of(self, role: Role) -> list[FakeEngine]:
        return [e for e in self.engines if e.role == role]

    async def start_registry(self, bind: str | None = None) -> None:
        self.registry_config.bind = bind or self.registry_config.bind
        self.registry = Registry(self.registry_config)
        await self.registry.start()
        self.registry_config.bind = self.registry.endpoint

    async def stop_registry(self) -> None:
        if self.registry is not None:
            await self.registry.close()
            self.registry = None

    async def add_engine(self, role: Role, **kwargs) -> FakeEngine:
        engine = FakeEngine(role, self.discovery_url, **{**self.engine_kwargs, **kwargs})
        await engine.start()
        self.engines.append(engine)
        return engine

    async def __aenter__(self) -> "FakeCluster":
        from services.gateway import GatewayConfig, serve

        if self.discovery is None:
            await self.start_registry()
        for role, count in self.roles.items():
            for _ in range(count):
                await self.add_engine(role)  # type: ignore[arg-type]
        config = GatewayConfig(**{"port": 0, "registry": self.discovery_url, "log_level": "warning",
                                  **self.gateway_overrides})
        ready, started = asyncio.Event(), asyncio.get_running_loop().create_future()
        self._gateway = asyncio.create_task(serve(config, ready=ready, started=started.set_result))
        await asyncio.wait({self._gateway, asyncio.ensure_future(ready.wait())}, timeout=10,
                           return_when=asyncio.FIRST_COMPLETED)
        if self._gateway.done():
            self._gateway.result()
        server = await started
        self.url = f"http://127.0.0.1:{server.port}"
        return self

    async def __aexit__(self, *exc) -> None:
        if self._gateway is not None:
            self._gateway.cancel()
            await asyncio.gather(self._gateway, return_exceptions=True)
        for e in self.engines:
            await e.stop()
        await self.stop_registry()
