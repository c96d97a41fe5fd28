"""The wire objects of Ollama's model endpoints: /api/tags, /api/show, /api/ps and /api/pull."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from server.api.protocol.common import RequestBody
from server.errors import InvalidRequest


class NamedRequest(RequestBody):
    """A body naming a model as `model` (or the older `name`)."""

    model: str | None = None
    name: str | None = None

    @property
    def target(self) -> str:
        if not (self.model or self.name):
            raise InvalidRequest("Name the model as 'model'.", param="model")
        return str(self.model or self.name)


class ShowRequest(NamedRequest):
    verbose: bool = False


class PullRequest(NamedRequest):
    stream: bool = Field(True, strict=True)
    insecure: bool = False


class ModelDetails(BaseModel):
    parent_model: str = ""
    format: str = "gguf"
    family: str = ""
    families: list[str] | None = None
    parameter_size: str = ""
    quantization_level: str = ""


class ListedModel(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int  # bytes of the GGUF
    digest: str
    details: ModelDetails


class TagsResponse(BaseModel):
    models: list[ListedModel]


class ShowResponse(BaseModel):
    license: str = ""
    modelfile: str
    parameters: str
    template: str  # the chat template (Jinja here, where Ollama's are Go templates)
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str | None = None


class RunningModel(BaseModel):
    name: str
    model: str
    size: int  # bytes the loaded model takes (RAM and VRAM)
    digest: str
    details: ModelDetails
    expires_at: str
    size_vram: int
    context_length: int | None = None


class PsResponse(BaseModel):
    models: list[RunningModel]


class ProgressResponse(BaseModel):
    status: str
    digest: str | None = None
    total: int | None = None
    completed: int | None = None
