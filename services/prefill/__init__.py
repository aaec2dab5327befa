"""The prefill engine service: `pdserve prefill` (see common/engine_service.py)."""

from common.engine_service import PrefillConfig, serve

__all__ = ["PrefillConfig", "serve"]
