"""POST /admin/reload (admin keys only): read models.yaml again without a restart (SIGHUP does
the same)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel

from server.api.routes.models import ADMIN_RESPONSES
from server.errors import InvalidRequest, RegistryError
from server.registry import Registry

router = APIRouter()
log = logging.getLogger("server.api")


class Reloaded(BaseModel):
    models: list[str]
    default: str


@router.post("/admin/reload", responses=ADMIN_RESPONSES)
async def reload(request: Request) -> Reloaded:
    """Re-read the registry; an invalid file is refused with its errors and the old one stays."""
    try:
        registry = await reload_registry(request.app)
    except RegistryError as exc:
        raise InvalidRequest(f"models.yaml was not reloaded: {exc}") from None
    return Reloaded(models=list(registry.specs), default=registry.default)


async def reload_registry(app: FastAPI) -> Registry:
    """Swap in the registry file as it is now; loaded models whose entry changed unload."""
    settings = app.state.settings
    registry = Registry.load(settings.models_file, settings.templates_dir, settings.models_dir,
                             settings.default_model)
    app.state.registry = registry
    await app.state.engine.use_registry(registry)
    log.info("registry reloaded from %s: %d models", settings.models_file, len(registry.specs))
    return registry
