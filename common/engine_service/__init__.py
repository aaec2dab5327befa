"""What every engine role shares: the service, its config, and the colocated role."""

from common.engine_service.colocated import ColocatedRole
from common.engine_service.config import EngineServiceConfig
from common.engine_service.service import EngineRole, EngineService, RoleFactory, serve

__all__ = ["ColocatedRole", "EngineRole", "EngineService", "EngineServiceConfig", "RoleFactory", "serve"]
