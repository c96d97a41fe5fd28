"""GET /health (the process answers) and GET /metrics (Prometheus text format)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.api.deps import EngineDep, MetricsDep, RegistryDep

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "Not ready; `problems` says why"}})
async def ready(request: Request, engine: EngineDep, registry: RegistryDep) -> JSONResponse:
    """Readiness: accepting, the models that must be preloaded are loaded, no queue is full."""
    required = dict.fromkeys([registry.default, *request.app.state.settings.preload])
    missing = [m for m in required if m not in engine.loaded()]
    failed = [m for m in engine.loaded() if engine.status(m).state == "failed"]
    problems = ([] if request.app.state.accepting else ["not accepting requests"]) + \
        [f"model {m} not loaded" for m in missing] + \
        [f"model {m} failed: {engine.status(m).error}" for m in failed] + \
        (["a request queue is full"] if engine.overloaded() else [])
    return JSONResponse({"status": "not ready" if problems else "ready", "problems": problems},
                        status_code=503 if problems else 200)


metrics_router = APIRouter()


@metrics_router.get("/metrics", response_class=PlainTextResponse,
                    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                     "description": "Prometheus text format"}})
async def metrics(m: MetricsDep) -> Response:
    return Response(m.render(), media_type=CONTENT_TYPE_LATEST)
