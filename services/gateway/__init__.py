"""The OpenAI-compatible HTTP gateway running the P/D read-mode flow."""

from services.gateway.app import Gateway, HTTPServer, serve
from services.gateway.config import GatewayConfig

__all__ = ["Gateway", "GatewayConfig", "HTTPServer", "serve"]
