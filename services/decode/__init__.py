"""The decode engine service: ``pdserve decode`` (role ``decode``, or ``both``).

Life cycle of a decode request and the decode role: ``services/decode/handoff.py``;
what all roles share: ``common.engine_service``.
"""

from functools import partial

from common.engine_service import ColocatedRole, EngineServiceConfig, RoleFactory
from common.engine_service import serve as serve_engine
from services.decode.handoff import DecodeHandoff

ROLES: dict[str, RoleFactory] = {"decode": DecodeHandoff, "both": ColocatedRole}  # the first is --role's default
serve = partial(serve_engine, roles=ROLES)

__all__ = ["ROLES", "DecodeHandoff", "EngineServiceConfig", "serve"]
