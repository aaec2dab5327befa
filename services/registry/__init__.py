"""The registry service: instance membership with leases, and a watch stream."""

from services.registry.server import Registry, RegistryConfig, serve

__all__ = ["Registry", "RegistryConfig", "serve"]
