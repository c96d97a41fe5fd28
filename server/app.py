"""create_app(settings, engine=None): the FastAPI application, built by a factory."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi

from server.api import chat, completions, health, models
from server.api.errors import install_error_handlers
from server.api.security import BodySizeLimit, require_api_key
from server.engine.base import Engine
from server.logs import REQUEST_ID
from server.metrics import Metrics
from server.registry import Registry
from server.settings import Settings, load_api_keys


def create_app(settings: Settings, engine: Engine | None = None,
               registry: Registry | None = None) -> FastAPI:
    """Build the app; without `engine`, the llama.cpp engine serves `registry`'s models."""
    registry = registry or Registry.load(settings.models_file, settings.templates_dir,
                                         settings.models_dir, settings.default_model)
    metrics = Metrics()
    if engine is None:
        from server.engine.llama import LlamaEngine  # keeps llama.cpp out of fake-engine tests

        engine = LlamaEngine(registry, settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await app.state.engine.start()
        app.state.accepting = True
        try:
            yield
        finally:
            app.state.accepting = False
            await app.state.engine.stop()

    app = FastAPI(title="ggserve", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.registry = registry
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.accepting = False
    app.state.api_keys = load_api_keys(settings)
    install_error_handlers(app)
    guarded = [Depends(require_api_key)]
    for module in (chat, completions, models):
        app.include_router(module.router, dependencies=guarded)
    app.include_router(health.router)
    app.include_router(health.metrics_router,
                       dependencies=guarded if settings.metrics_require_key else [])
    app.middleware("http")(_observe_request)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                           expose_headers=["X-Request-Id"])
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    app.openapi = lambda: _openapi_without_422(app)  # type: ignore[method-assign]
    return app


def _openapi_without_422(app: FastAPI) -> dict[str, Any]:
    """FastAPI documents 422 for bodies; this server answers invalid bodies with 400."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        app.openapi_schema = schema
    return app.openapi_schema


async def _observe_request(request: Request,
                           call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """Tag the request with its id (the client's x-request-id, else a new one) and count it."""
    request_id = request.headers.get("x-request-id", "")[:128] or uuid.uuid4().hex
    token = REQUEST_ID.set(request_id)
    try:
        response = await call_next(request)
    finally:
        REQUEST_ID.reset(token)
    response.headers["x-request-id"] = request_id
    metrics: Metrics = request.app.state.metrics
    metrics.http_requests.labels(_route(request), f"{response.status_code // 100}xx").inc()
    return response


def _route(request: Request) -> str:
    """The matched route's template (bounded), never the raw path a client sent."""
    route = request.scope.get("route")  # set by the router once it matched
    return str(getattr(route, "path", "unmatched"))
