"""POST /v1/embeddings, from registry models marked `embedding: true`."""

from __future__ import annotations

import base64
import logging
import struct
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field, field_validator

from server.api.deps import EngineDep, MetricsDep, RegistryDep, SettingsDep
from server.api.protocol.common import ERROR_RESPONSES, RequestBody
from server.api.serving import metered_call
from server.errors import InvalidRequest

router = APIRouter()
log = logging.getLogger("server.requests")
MAX_INPUTS = 2048  # OpenAI's limit per request


class EmbeddingRequest(RequestBody):
    input: str | list[str] | list[int] | list[list[int]]
    model: str
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, strict=True)
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, value: Any) -> Any:
        """One message for every wrong shape (not one per member of the union)."""
        def ids(items: Any) -> bool:
            return isinstance(items, list) and all(type(v) is int for v in items)

        texts = isinstance(value, list) and all(isinstance(v, str) for v in value)
        if isinstance(value, str) or texts or ids(value) or (
                isinstance(value, list) and all(ids(v) for v in value)):
            return value
        raise ValueError("expected a string, a list of strings, a list of token ids, or a list "
                         "of lists of token ids")

    def inputs(self) -> list[str] | list[list[int]]:
        """The inputs as a list (token ids kept apart from texts); InvalidRequest names the
        first one that cannot be embedded."""
        if self.dimensions is not None:
            raise InvalidRequest("'dimensions' is not supported: this server returns each "
                                 "model's full vectors. Remove it.", param="dimensions")
        value = self.input
        inputs: list[str] | list[list[int]]
        if isinstance(value, str):
            inputs = [value]
        elif value and isinstance(value[0], int):
            inputs = [value]  # one input of token ids
        else:
            inputs = value  # type: ignore[assignment]
        if not inputs:
            raise InvalidRequest("'input' is empty; send a string or a list of them.",
                                 param="input")
        if len(inputs) > MAX_INPUTS:
            raise InvalidRequest(f"'input' has {len(inputs)} items; this server embeds at most "
                                 f"{MAX_INPUTS} per request.", param="input")
        for index, item in enumerate(inputs):
            if not item:
                raise InvalidRequest(f"Input {index} is empty; every input needs text or "
                                     "tokens.", param="input")
        return inputs


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64: the little-endian float32 bytes


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class CreateEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


@router.post("/v1/embeddings", responses=ERROR_RESPONSES)
async def create_embeddings(body: EmbeddingRequest, engine: EngineDep, registry: RegistryDep,
                            metrics: MetricsDep,
                            settings: SettingsDep) -> CreateEmbeddingResponse:
    inputs = body.inputs()
    spec = registry.get(body.model)
    result = await metered_call(engine.embed(spec.id, inputs), metrics=metrics, model=spec.id,
                                endpoint="embeddings", timeout_s=settings.request_timeout_s,
                                what="inputs", count=len(inputs))
    metrics.prompt_tokens.labels(spec.id).inc(result.prompt_tokens)
    as_base64 = body.encoding_format == "base64"
    return CreateEmbeddingResponse(
        data=[Embedding(index=i, embedding=_base64(v) if as_base64 else v)
              for i, v in enumerate(result.vectors)],
        model=spec.id,
        usage=EmbeddingUsage(prompt_tokens=result.prompt_tokens,
                             total_tokens=result.prompt_tokens))


def _base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
