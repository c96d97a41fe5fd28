"""Ollama's embeddings: POST /api/embed (inputs truncated to the model's context unless
`truncate` is false, vectors shortened to `dimensions`) and the legacy POST /api/embeddings (one
prompt), from registry models marked `embedding: true`. Vectors are L2-normalised (on the
legacy endpoint too, where Ollama's are not)."""

from __future__ import annotations

import math
import time

from fastapi import APIRouter
from pydantic import BaseModel, Field, field_validator

from server.api.deps import EngineDep, MetricsDep, RegistryDep, SettingsDep
from server.api.protocol.common import RequestBody
from server.api.protocol.ollama import ERRORS, Options, keep_alive_seconds
from server.api.routes.ollama import resolve
from server.api.serving import metered_call
from server.chat.template import plain_prompt
from server.engine.base import Embeddings, Engine
from server.errors import InputTooLong, InvalidRequest
from server.metrics import Metrics
from server.settings import Settings

router = APIRouter()


class EmbedRequest(RequestBody):
    model: str = Field(min_length=1)
    input: str | list[str]
    truncate: bool = Field(True, strict=True)  # false: a too long input is an error
    dimensions: int | None = Field(None, ge=1, strict=True)
    options: Options | None = None  # load settings: models.yaml's here
    keep_alive: float | str | None = None  # only 0 (unload afterwards)

    @field_validator("keep_alive")
    @classmethod
    def _keep_alive(cls, value: float | str | None) -> float | None:
        return keep_alive_seconds(value)

    def texts(self) -> list[str]:
        """The inputs; none (an empty string or list) only loads the model."""
        texts = ([self.input] if self.input else []) if isinstance(self.input, str) \
            else self.input
        for index, text in enumerate(texts):
            if not text:
                raise InvalidRequest(f"'input.{index}' is empty: every input needs text.",
                                     param=f"input.{index}")
        return texts


class EmbeddingsRequest(RequestBody):
    """The legacy body: one prompt."""

    model: str = Field(min_length=1)
    prompt: str = ""
    options: Options | None = None
    keep_alive: float | str | None = None

    @field_validator("keep_alive")
    @classmethod
    def _keep_alive(cls, value: float | str | None) -> float | None:
        return keep_alive_seconds(value)


class EmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int  # nanoseconds
    load_duration: int
    prompt_eval_count: int


class EmbeddingsResponse(BaseModel):
    embedding: list[float]


@router.post("/api/embed", responses=ERRORS)
async def embed(body: EmbedRequest, engine: EngineDep, registry: RegistryDep,
                metrics: MetricsDep, settings: SettingsDep) -> EmbedResponse:
    received = time.perf_counter()
    spec = resolve(registry, body.model)
    texts = body.texts()
    _check_keep_alive(body.keep_alive)
    if body.options is not None:  # sampling and load settings: nothing an embedding uses
        body.options.report_ignored(everything=True)
    result = await _embed(engine, spec.id, texts, body.truncate, metrics, settings)
    if body.keep_alive == 0:
        await engine.unload(spec.id)
    if body.dimensions is not None and result.vectors and \
            body.dimensions > len(result.vectors[0]):
        raise InvalidRequest(f"dimensions is {body.dimensions}; this model's vectors have "
                             f"{len(result.vectors[0])}.", param="dimensions")
    return EmbedResponse(
        model=body.model, embeddings=[_shorten(v, body.dimensions) for v in result.vectors],
        total_duration=int((time.perf_counter() - received) * 1e9), load_duration=0,
        prompt_eval_count=result.prompt_tokens)


@router.post("/api/embeddings", responses=ERRORS)
async def embeddings(body: EmbeddingsRequest, engine: EngineDep, registry: RegistryDep,
                     metrics: MetricsDep, settings: SettingsDep) -> EmbeddingsResponse:
    """The legacy endpoint: one prompt's vector (an empty prompt: none, the model loaded)."""
    spec = resolve(registry, body.model)
    _check_keep_alive(body.keep_alive)
    if body.options is not None:
        body.options.report_ignored(everything=True)
    result = await _embed(engine, spec.id, [body.prompt] if body.prompt else [], True, metrics,
                          settings)
    if body.keep_alive == 0:
        await engine.unload(spec.id)
    return EmbeddingsResponse(embedding=result.vectors[0] if result.vectors else [])


def _check_keep_alive(keep_alive: float | str | None) -> None:
    # An embedding model's idle time is its models.yaml keep_alive (or the server's).
    if keep_alive not in (None, 0):
        raise InvalidRequest("keep_alive on embeddings takes only 0 (unload the model "
                             "afterwards); set a model's idle time as its keep_alive in "
                             "models.yaml.", param="keep_alive")


async def _embedded(engine: Engine, model: str, texts: list[str], truncate: bool) -> Embeddings:
    """The vectors, inputs cut to the context when they are too long and `truncate` allows."""
    try:
        return await engine.embed(model, texts)
    except InputTooLong:
        if not truncate:
            raise
        return await _truncated(engine, model, texts)


async def _embed(engine: Engine, model: str, texts: list[str], truncate: bool,
                 metrics: Metrics, settings: Settings) -> Embeddings:
    """The engine's vectors for `texts`, counted in the metrics as /v1/embeddings counts them."""
    if not texts:
        await engine.load(model)
        return Embeddings([], 0)
    result = await metered_call(_embedded(engine, model, texts, truncate), metrics=metrics,
                                model=model, endpoint="ollama_embed",
                                timeout_s=settings.request_timeout_s, what="inputs",
                                count=len(texts))
    metrics.prompt_tokens.labels(model).inc(result.prompt_tokens)
    return result


async def _truncated(engine: Engine, model: str, texts: list[str]) -> Embeddings:
    """`texts` cut to the model's context: their first n_ctx tokens (as the model reads them)."""
    n_ctx = (await engine.model_info(model)).n_ctx
    tokens = [(await engine.tokenize(model, plain_prompt(text), True))[:n_ctx]
              for text in texts]
    return await engine.embed(model, tokens)


def _shorten(vector: list[float], dimensions: int | None) -> list[float]:
    """The first `dimensions` numbers, normalised again (as Ollama does, for Matryoshka
    embeddings); the whole vector without `dimensions`."""
    if dimensions is None or dimensions >= len(vector):
        return vector
    head = vector[:dimensions]
    norm = math.hypot(*head) or 1.0
    return [v / norm for v in head]
