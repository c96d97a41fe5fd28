"""GET /v1/models and /v1/models/{id}."""

from __future__ import annotations

import time

from fastapi import APIRouter

from server.api.deps import EngineDep, RegistryDep
from server.api.schemas import ERROR_RESPONSES, Model, ModelList

router = APIRouter()
_STARTED = int(time.time())


@router.get("/v1/models", responses={401: ERROR_RESPONSES[401]})
async def list_models(registry: RegistryDep, engine: EngineDep) -> ModelList:
    loaded = set(engine.loaded())
    return ModelList(data=[Model(id=spec.id, created=_STARTED, loaded=spec.id in loaded)
                           for spec in registry])


@router.get("/v1/models/{model_id:path}",
            responses={401: ERROR_RESPONSES[401], 404: ERROR_RESPONSES[404]})
async def retrieve_model(model_id: str, registry: RegistryDep, engine: EngineDep) -> Model:
    spec = registry.get(model_id)
    return Model(id=spec.id, created=_STARTED, loaded=spec.id in engine.loaded())
