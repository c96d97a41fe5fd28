"""Ollama's model endpoints: GET /api/tags (the registry models whose GGUF is on disk), POST
/api/show, GET /api/ps (the loaded ones), and POST /api/pull (admin: download a registry entry,
with NDJSON progress).

A model's facts come from its registry entry and its GGUF's header (read without loading it).
A digest is the SHA-256 of the file's path, size and modification time: stable while the file
is, without hashing gigabytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from server.api.deps import EngineDep, RegistryDep, SettingsDep
from server.api.protocol.ollama import ERRORS, OllamaError, ndjson
from server.api.protocol.ollama_models import (
    ListedModel,
    ModelDetails,
    ProgressResponse,
    PsResponse,
    PullRequest,
    RunningModel,
    ShowRequest,
    ShowResponse,
    TagsResponse,
)
from server.api.routes.ollama import can_think, ndjson_error, resolve
from server.api.sse import stream_response
from server.engine.base import Engine
from server.errors import ModelLoadFailed, ModelNotFound
from server.gguf_metadata import GGUFMetadata, read_metadata
from server.registry import ModelSpec, Registry
from server.settings import Settings

log = logging.getLogger("server.api")
router = APIRouter()
admin_router = APIRouter()
PULL_POLL_S = 0.25  # how often a pull reports its download's progress
FOREVER = "2318-01-01T00:00:00Z"  # a model kept loaded forever expires, as on Ollama, ~2318
# Pulls whose client went away: the download goes on (it resumes anyway), held here so that
# the task is not collected.
_pulls: set[asyncio.Task[Any]] = set()
PULL_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {"schema": {"type": "object"}},
                      "application/x-ndjson": {"schema": {"type": "string"}}}},
    403: {"model": OllamaError, "description": "Needs an admin key, or another origin's page"},
    **ERRORS}


@dataclass(frozen=True)
class _OnDisk:
    """A registry model's GGUF on disk, and what its header says (None: unreadable)."""

    spec: ModelSpec
    path: Path
    size: int
    mtime_ns: int
    meta: GGUFMetadata | None

    @property
    def digest(self) -> str:
        return _sha256(f"{self.path}:{self.size}:{self.mtime_ns}")

    @property
    def modified_at(self) -> str:
        return datetime.fromtimestamp(self.mtime_ns / 1e9, UTC).isoformat()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _variants(registry: Registry) -> Iterator[ModelSpec]:
    """Each entry, then its other published quants (`id:QUANT`)."""
    for spec in registry:
        yield spec
        yield from (registry.get(f"{spec.id}:{q}") for q in spec.quants if q != spec.quant)


async def _on_disk(registry: Registry, spec: ModelSpec) -> _OnDisk | None:
    try:
        path = registry.local_file(spec)
    except ModelLoadFailed:
        return None
    if not path.is_file():
        return None
    stat = path.stat()
    return _OnDisk(spec, path, stat.st_size, stat.st_mtime_ns,
                   await asyncio.to_thread(_header, path))


def _header(path: Path) -> GGUFMetadata | None:
    try:
        return read_metadata(path)
    except (OSError, ValueError) as exc:
        log.warning("cannot read the GGUF header of %s: %s", path, exc)
        return None


def _details(spec: ModelSpec, meta: GGUFMetadata | None) -> ModelDetails:
    quant = (meta.quantization if meta else None) or spec.quant or ""
    if meta is None or not meta.architecture:
        return ModelDetails(quantization_level=quant)
    return ModelDetails(family=meta.architecture, families=[meta.architecture],
                        parameter_size=_human(meta.parameter_count), quantization_level=quant)


def _human(count: int) -> str:
    """A parameter count as Ollama shows it: 135M, 7.2B."""
    if count >= 10**9:
        return f"{count / 1e9:.1f}B"
    return f"{count / 1e6:.0f}M" if count >= 10**6 else f"{count / 1e3:.0f}K"


@router.get("/api/tags", responses={401: ERRORS[401]})
async def tags(registry: RegistryDep) -> TagsResponse:
    """The registry's models whose GGUF is on disk (each published quant that is, as id:QUANT,
    and each LoRA adapter whose file is, as id:adapter)."""
    found = [f for spec in _variants(registry) if (f := await _on_disk(registry, spec))]
    listed = []
    for f in found:
        listed.append(ListedModel(name=f.spec.id, model=f.spec.id, modified_at=f.modified_at,
                                  size=f.size, digest=f.digest, details=_details(f.spec, f.meta)))
        # its LoRA adapters whose file is here, as the models a request names (`id:adapter`)
        for adapter in f.spec.lora if f.spec.id in registry.specs else ():
            file = registry.lora_file(adapter)
            if file.is_file():
                name = f"{f.spec.id}:{adapter.name}"
                listed.append(ListedModel(
                    name=name, model=name, modified_at=f.modified_at,
                    size=f.size + file.stat().st_size, digest=_sha256(f"{f.digest}:{file}"),
                    details=_details(f.spec, f.meta)))
    return TagsResponse(models=listed)


@router.post("/api/show", responses=ERRORS)
async def show(body: ShowRequest, registry: RegistryDep, engine: EngineDep) -> ShowResponse:
    """A model's template, parameters, GGUF metadata and capabilities (its file need not be
    loaded; one not downloaded yet shows what the registry says)."""
    spec = resolve(registry, body.target)
    found = await _on_disk(registry, spec)
    meta = found.meta if found else None
    template = None if spec.chat_template_off else (
        registry.template_source(spec) or (meta.values.get("tokenizer.chat_template")
                                           if meta else None))
    n_ctx = engine.status(spec.id).n_ctx
    parameters = _parameters(spec, n_ctx)
    modelfile = [f"# Modelfile of {spec.id}, from its models.yaml entry",
                 f"FROM {found.path if found else spec.repo or spec.id}"]
    modelfile += [f'TEMPLATE """{template}"""'] if template else []
    modelfile += [f"PARAMETER {name} {value}" for name, value in parameters]
    return ShowResponse(
        modelfile="\n".join(modelfile) + "\n",
        parameters="\n".join(f"{name:<30} {value}" for name, value in parameters),
        template=template or "", details=_details(spec, meta),
        model_info=_model_info(spec, meta, n_ctx), capabilities=_capabilities(spec, template),
        modified_at=found.modified_at if found else None)


def _parameters(spec: ModelSpec, n_ctx: int | None) -> list[tuple[str, Any]]:
    """The entry's defaults, as Ollama's Modelfile PARAMETERs."""
    s = spec.sampling
    pairs: list[tuple[str, Any]] = [("num_ctx", n_ctx)] if n_ctx else []
    pairs += [("stop", f'"{stop}"') for stop in spec.stop]
    pairs += [("temperature", s.temperature), ("top_p", s.top_p), ("top_k", s.top_k),
              ("min_p", s.min_p), ("repeat_penalty", s.repeat_penalty)]
    return pairs + ([("num_predict", s.max_tokens)] if s.max_tokens else [])


def _model_info(spec: ModelSpec, meta: GGUFMetadata | None,
                n_ctx: int | None) -> dict[str, Any]:
    """The GGUF's scalar metadata, but `general.basename` is the registry id (clients such as
    VS Code Copilot show it as the model's name, and entries may share a file) and
    `<arch>.context_length` the context this server serves per request (what clients budget
    prompts by), not the training context."""
    if meta is None:
        return {"general.basename": spec.id}
    info = {k: v for k, v in meta.values.items() if k != "tokenizer.chat_template"}
    info.update({"general.basename": spec.id, "general.parameter_count": meta.parameter_count})
    if n_ctx and meta.architecture:
        info[f"{meta.architecture}.context_length"] = n_ctx
    return info


def _capabilities(spec: ModelSpec, template: str | None) -> list[str]:
    """What the model does here: embeddings only, or completion, and with a chat template tool
    calls (every template takes tools here), and thinking for a reasoning format."""
    if spec.embedding:
        return ["embedding"]
    return ["completion"] + (["tools"] if template else []) + (
        ["thinking"] if can_think(spec, template) else [])


@router.get("/api/ps", responses={401: ERRORS[401]})
async def ps(registry: RegistryDep, engine: EngineDep, settings: SettingsDep) -> PsResponse:
    """The loaded models, with their memory (`size_vram`: the part on the GPU)."""
    running = []
    for model in engine.loaded():
        try:
            spec, status = registry.get(model), engine.status(model)
        except ModelNotFound:  # the registry dropped it; it unloads once idle
            continue
        if status.state != "loaded":
            continue
        found = await _on_disk(registry, spec)
        running.append(RunningModel(
            name=model, model=model, size=status.memory_ram + status.memory_vram,
            digest=found.digest if found else "",
            details=_details(spec, found.meta if found else None),
            expires_at=_expiry(spec, settings), size_vram=status.memory_vram,
            context_length=status.n_ctx))
    return PsResponse(models=running)


def _expiry(spec: ModelSpec, settings: Settings) -> str:
    """When an idle model unloads: its keep_alive from now (an upper bound while it is idle;
    a request's own keep_alive is not tracked here)."""
    keep_alive = spec.keep_alive if spec.keep_alive is not None else settings.keep_alive
    if keep_alive < 0:
        return FOREVER
    return (datetime.now(UTC) + timedelta(seconds=keep_alive)).isoformat()


@admin_router.post("/api/pull", response_model=None, responses=PULL_RESPONSES)
async def pull(body: PullRequest, registry: RegistryDep, engine: EngineDep) -> Response:
    """Download a registry model's GGUF (it is loaded once downloaded); NDJSON progress unless
    `stream` is false."""
    spec = resolve(registry, body.target)
    steps = _pull(engine, registry, spec)
    if body.stream:
        return stream_response((ndjson(step) async for step in steps), on_close=lambda: None,
                               error=ndjson_error, media_type="application/x-ndjson",
                               ping=None)
    async for _ in steps:
        pass
    return JSONResponse({"status": "success"})


async def _pull(engine: Engine, registry: Registry, spec: ModelSpec) -> \
        AsyncIterator[ProgressResponse]:
    yield ProgressResponse(status="pulling manifest")
    path = registry.local_file(spec)  # a local file that is missing: ModelLoadFailed
    digest = "sha256:" + _sha256(f"{spec.repo}/{spec.file_name}" if spec.repo else str(path))
    layer = f"pulling {digest[7:19]}"
    if not path.is_file():
        async for progress in _download(engine, spec, path, layer, digest):
            yield progress
    size = path.stat().st_size if path.is_file() else None
    yield ProgressResponse(status=layer, digest=digest, total=size, completed=size)
    yield ProgressResponse(status="success")


async def _download(engine: Engine, spec: ModelSpec, path: Path, layer: str,
                    digest: str) -> AsyncIterator[ProgressResponse]:
    """The engine's download of `spec` (then its load), reported as it goes."""
    task = asyncio.ensure_future(engine.load(spec.id))
    _pulls.add(task)
    task.add_done_callback(_pulls.discard)
    last: tuple[int | None, float] = (None, 0.0)
    while not task.done():
        status = engine.status(spec.id)
        done, total = status.downloaded, status.download_size
        if status.state == "downloading" and total and (
                done != last[0] or time.monotonic() - last[1] > 5):  # alive while it waits
            last = (done, time.monotonic())
            yield ProgressResponse(status=layer, digest=digest, total=total, completed=done)
        await asyncio.wait([task], timeout=PULL_POLL_S)
    failure = task.exception()
    if failure is not None:
        if not path.is_file():
            raise failure
        log.warning("model %s was downloaded but does not load: %s", spec.id, failure)
    yield ProgressResponse(status="verifying sha256 digest")  # the hub's, checked on download
