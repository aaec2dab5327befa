"""The OpenAI-compatible HTTP gateway running the P/D read-mode flow."""

from services.gateway.app import Gateway
from services.gateway.config import GatewayConfig
from services.gateway.server import HTTPServer, serve

__all__ = ["Gateway", "GatewayConfig", "HTTPServer", "serve"]
