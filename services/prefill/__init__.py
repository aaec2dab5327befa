"""The prefill engine service: ``pdserve prefill`` (role ``prefill``, or ``both``).

Life cycle of a prefill request: ``services/prefill/handoff.py``; the role
object: ``services/prefill/role.py``; what all roles share: ``common.engine_service``.
"""

from functools import partial

from common.engine_service import ColocatedRole, EngineServiceConfig, RoleFactory
from common.engine_service import serve as serve_engine
from services.prefill.handoff import PrefillHandoff
from services.prefill.role import PrefillRole

ROLES: dict[str, RoleFactory] = {"prefill": PrefillRole, "both": ColocatedRole}  # the first is --role's default
serve = partial(serve_engine, roles=ROLES)

__all__ = ["ROLES", "EngineServiceConfig", "PrefillHandoff", "PrefillRole", "serve"]
