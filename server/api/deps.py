"""Dependency aliases: handlers reach the app's engine, registry, metrics, settings and stored
Responses through these."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Request

from server.api.response_store import ResponseStore
from server.engine.base import Engine
from server.metrics import Metrics
from server.registry import Registry
from server.settings import Settings


def _app_state(name: str) -> Callable[[Request], Any]:
    def get(request: Request) -> Any:
        return getattr(request.app.state, name)

    return get


EngineDep = Annotated[Engine, Depends(_app_state("engine"))]
RegistryDep = Annotated[Registry, Depends(_app_state("registry"))]
MetricsDep = Annotated[Metrics, Depends(_app_state("metrics"))]
SettingsDep = Annotated[Settings, Depends(_app_state("settings"))]
ResponseStoreDep = Annotated[ResponseStore, Depends(_app_state("responses"))]
