"""create_app(settings, engine=None): the FastAPI application, built by a factory."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import install_error_handlers, unexpected_error_response
from server.api.protocol.common import IGNORED_FIELDS, printable
from server.api.response_store import ResponseStore
from server.api.routes import (
    admin,
    anthropic,
    chat,
    completions,
    embeddings,
    health,
    infill,
    models,
    ollama,
    ollama_embed,
    ollama_models,
    rerank,
    responses,
    tokenizer,
    ui,
)
from server.api.routes.admin import reload_registry
from server.api.security import Access, AccessControl, BodySizeLimit, Keys, warn_if_exposed
from server.engine.base import Engine
from server.errors import RegistryError
from server.logs import REQUEST_ID
from server.metrics import Metrics
from server.registry import Registry
from server.settings import Settings

log = logging.getLogger("server")


def create_app(settings: Settings, engine: Engine | None = None,
               registry: Registry | None = None) -> FastAPI:
    """Build the app; without `engine`, the llama.cpp engine serves `registry`'s models."""
    registry = registry or Registry.load(settings.models_file, settings.templates_dir,
                                         settings.models_dir, settings.default_model)
    metrics = Metrics(vllm_names=settings.metrics_vllm_names)
    if engine is None:
        from server.engine.manager import LlamaEngine  # keeps llama.cpp out of fake-engine tests

        engine = LlamaEngine(registry, settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        warn_if_exposed(settings, keys)
        await app.state.engine.start()
        app.state.accepting = True
        _reload_on_sighup(app)
        try:
            yield
        finally:
            app.state.accepting = False
            await app.state.engine.stop()

    keys = Keys.from_settings(settings)
    app = FastAPI(title="ggserve", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.registry = registry
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.responses = ResponseStore()  # recent /v1/responses, for previous_response_id
    app.state.accepting = False
    install_error_handlers(app)
    open_routers = [health.router] + ([] if settings.metrics_require_key
                                      else [health.metrics_router])
    if settings.ui:  # the page itself is open; it asks for a key when the API wants one
        open_routers.append(ui.router)
        app.include_router(ui.router)
    levels: dict[str, Access] = {**dict.fromkeys(_paths(admin.router, models.admin_router,
                                                        ollama_models.admin_router),
                                                 "admin"),
                                 **dict.fromkeys(_paths(*open_routers), "open")}
    for router in (chat.router, completions.router, embeddings.router, tokenizer.router,
                   responses.router,
                   rerank.router, infill.router,
                   anthropic.router,
                   ollama.router, ollama_embed.router, ollama_models.router,
                   ollama_models.admin_router,
                   models.router, models.admin_router, admin.router, health.router,
                   health.metrics_router):
        app.include_router(router)
    # Inside CORS (a preflight needs no key, and a 401 carries the CORS headers a page needs
    # to read it); every path not listed, /docs and /openapi.json included, needs a user key.
    app.add_middleware(AccessControl, keys=keys, levels=levels, origins=settings.cors_origins)
    if settings.cors_origins:
        # Any request header: browser SDKs send their own (openai's and anthropic's
        # x-stainless-*, anthropic-version, x-api-key, ...), and which origins may call is
        # what protects the server, not which headers they carry.
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                           allow_headers=["*"],
                           expose_headers=["X-Request-Id", "X-Ignored-Fields"])
    app.add_middleware(BodySizeLimit, limit=settings.max_body_bytes)
    # Outermost, so that every response (a 413, a CORS preflight, a 500) carries the id.
    app.add_middleware(ObserveRequests, metrics=metrics)
    app.openapi = lambda: _openapi_without_422(app)  # type: ignore[method-assign]
    return app


def _paths(*routers: APIRouter) -> list[str]:
    return [str(getattr(route, "path", "")) for router in routers for route in router.routes]


def _reload_on_sighup(app: FastAPI) -> None:
    """SIGHUP re-reads models.yaml (a bad file is logged and the old registry stays)."""

    async def reload() -> None:
        try:
            await reload_registry(app)
        except RegistryError as exc:
            log.error("models.yaml was not reloaded: %s", exc)

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not main thread
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGHUP, lambda: asyncio.ensure_future(reload()))


def _openapi_without_422(app: FastAPI) -> dict[str, Any]:
    """FastAPI documents 422 for bodies; this server answers invalid bodies with 400."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for method, operation in path.items():
                operation.get("responses", {}).pop("422", None)
                if method == "post":  # AccessControl refuses bodies that are not JSON
                    operation["responses"].setdefault("415", {
                        "description": "The body is not JSON", "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}})
        app.openapi_schema = schema
    return app.openapi_schema


class ObserveRequests:
    """Tag each request with its id (the client's x-request-id, else a new one), return it as a
    header, and count the request by route and status class once the response is complete.
    Unknown request fields the body's model reported are named in an x-ignored-fields header.
    An unexpected error before the response started is answered here with a 500.

    A plain ASGI middleware: a streamed body passes straight through (Starlette's
    BaseHTTPMiddleware would relay every chunk through a memory stream and another task).
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id", b"")[:128]
        request_id = given.decode("latin-1") or uuid.uuid4().hex
        status = 500
        started = False
        ignored: list[str] = []

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                extra = [(b"x-request-id", request_id.encode("latin-1"))]
                if ignored:
                    # printable ASCII whoever reported them (a dialect's own options too)
                    names = ", ".join(printable(name) for name in ignored)
                    extra.append((b"x-ignored-fields", names.encode("ascii")))
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        token = REQUEST_ID.set(request_id)
        fields = IGNORED_FIELDS.set(ignored)
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            if started:  # nothing can change the status now: the server ends the connection
                raise
            # Answered, not re-raised: Starlette's outer handler would send this 500 without
            # the id and re-raise, and uvicorn then closes the keep-alive connection, failing
            # the next request a client (or a proxy, for another user) sends on it.
            await unexpected_error_response(exc)(scope, receive, send_with_id)
        finally:
            IGNORED_FIELDS.reset(fields)
            REQUEST_ID.reset(token)
            self.metrics.http_requests.labels(_route(scope), f"{status // 100}xx").inc()


def _route(scope: Scope) -> str:
    """The matched route's template (bounded), never the raw path a client sent."""
    route = scope.get("route")  # set by the router once it matched
    return str(getattr(route, "path", "unmatched"))
