"""The decode engine service: `pdserve decode` (see common/engine_service.py)."""

from common.engine_service import DecodeConfig, serve

__all__ = ["DecodeConfig", "serve"]
