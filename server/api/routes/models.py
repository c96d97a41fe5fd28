"""GET /v1/models (every registry entry and where it stands); POST /models/load and /unload, for
admin keys only."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter

from server.api.deps import EngineDep, RegistryDep
from server.api.protocol.common import ERROR_RESPONSES, ErrorResponse
from server.api.protocol.openai_models import (
    DownloadProgress,
    LoadRequest,
    Model,
    ModelList,
    Placement,
)
from server.engine.base import Engine
from server.registry import ModelSpec

router = APIRouter()
admin_router = APIRouter()
_STARTED = int(time.time())
_GUARDED: dict[int | str, dict[str, Any]] = {401: ERROR_RESPONSES[401],
                                              404: ERROR_RESPONSES[404]}
# 400: a body that is not {"model": str}; 403: a key without the admin scope, or a page from
# another origin; 415: a body that is not JSON.
ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: ERROR_RESPONSES[400], 401: ERROR_RESPONSES[401],
    403: {"model": ErrorResponse, "description": "Needs an admin key, or another origin's page"},
    415: {"model": ErrorResponse, "description": "The body is not JSON"}}


@router.get("/v1/models", responses={401: ERROR_RESPONSES[401]})
async def list_models(registry: RegistryDep, engine: EngineDep) -> ModelList:
    return ModelList(data=[_describe(spec, engine) for spec in registry])


@router.get("/v1/models/{model_id:path}", responses=_GUARDED)
async def retrieve_model(model_id: str, registry: RegistryDep, engine: EngineDep) -> Model:
    return _describe(registry.get(model_id), engine)


@admin_router.post("/models/load", responses={**ADMIN_RESPONSES, **_GUARDED})
async def load_model(body: LoadRequest, registry: RegistryDep, engine: EngineDep) -> Model:
    """Load a model now (downloading it first if needed); returns once it is loaded."""
    spec = registry.get(body.model)
    await engine.load(spec.id)
    return _describe(spec, engine)


@admin_router.post("/models/unload", responses={**ADMIN_RESPONSES, **_GUARDED})
async def unload_model(body: LoadRequest, registry: RegistryDep, engine: EngineDep) -> Model:
    """Unload a model now, or as soon as the requests it is serving finish."""
    spec = registry.get(body.model)
    await engine.unload(spec.id)
    return _describe(spec, engine)


def _describe(spec: ModelSpec, engine: Engine) -> Model:
    status = engine.status(spec.id)
    loaded = status.state == "loaded"
    return Model(
        id=spec.id, created=_STARTED, loaded=loaded, status=status.state,
        kind="rerank" if spec.reranker else "embedding" if spec.embedding else "chat",
        size_bytes=status.size,
        error=status.error,
        download=DownloadProgress(downloaded=status.downloaded, total=status.download_size)
        if status.downloaded is not None else None,
        quant=spec.quant, quants=list(spec.quants), n_ctx=status.n_ctx or spec.n_ctx,
        placement=Placement(device=status.device, gpu_layers=status.gpu_layers,
                            n_layers=status.n_layer, memory_ram_bytes=status.memory_ram,
                            memory_vram_bytes=status.memory_vram) if loaded else None)
