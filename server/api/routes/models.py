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
from server.registry import LoraSpec, ModelSpec, Registry

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
    """Every entry, each followed by its LoRA adapters (`id:adapter`, `parent`: the entry)."""
    return ModelList(data=[_describe(spec, engine, registry, adapter)
                           for spec in registry for adapter in (None, *spec.lora)])


@router.get("/v1/models/{model_id:path}", responses=_GUARDED)
async def retrieve_model(model_id: str, registry: RegistryDep, engine: EngineDep) -> Model:
    spec = registry.get(model_id)
    name = spec.served_adapter(model_id)
    return _describe(spec, engine, registry, None if name is None else spec.adapter(name))


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


def _describe(spec: ModelSpec, engine: Engine, registry: Registry | None = None,
              adapter: LoraSpec | None = None) -> Model:
    """An entry as /v1/models lists it; with `adapter`, that adapter of it (loaded with it)."""
    status = engine.status(spec.id)
    loaded = status.state == "loaded"
    size = status.size
    if adapter is not None and registry is not None:
        file = registry.lora_file(adapter)
        size = file.stat().st_size if file.is_file() else None
    return Model(
        id=spec.id if adapter is None else f"{spec.id}:{adapter.name}",
        parent=None if adapter is None else spec.id,
        created=_STARTED, loaded=loaded, status=status.state,
        kind="rerank" if spec.reranker else "embedding" if spec.embedding else "chat",
        size_bytes=size,
        error=status.error,
        download=DownloadProgress(downloaded=status.downloaded, total=status.download_size)
        if status.downloaded is not None else None,
        quant=spec.quant, quants=list(spec.quants), n_ctx=status.n_ctx or spec.n_ctx,
        placement=Placement(device=status.device, gpu_layers=status.gpu_layers,
                            n_layers=status.n_layer, memory_ram_bytes=status.memory_ram,
                            memory_vram_bytes=status.memory_vram) if loaded else None)
