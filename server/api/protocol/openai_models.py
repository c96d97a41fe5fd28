"""The model list (GET /v1/models), with where each model stands in this server as extensions."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from server.api.protocol.common import RequestBody
from server.engine.base import ModelState


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ggserve"
    # --- extensions: where the model stands in this server ---
    parent: str | None = None  # a LoRA adapter's base model (vLLM lists adapters so)
    loaded: bool = False
    # loaded, loading, on_disk (ready to load), not_downloaded (a download of size_bytes, or a
    # missing file: see error), downloading (see download), failed (see error)
    status: ModelState = "on_disk"
    kind: Literal["chat", "embedding", "rerank"] = "chat"  # which endpoints it serves
    size_bytes: int | None = None  # its GGUF, on disk or to download (None: not known)
    error: str | None = None  # why the last load failed, or why its file is missing
    download: DownloadProgress | None = None
    quant: str | None = None
    quants: list[str] = Field(default_factory=list)
    n_ctx: int | None = None
    placement: Placement | None = None  # set while loaded


class DownloadProgress(BaseModel):
    downloaded: int
    total: int | None


class Placement(BaseModel):
    device: str  # "cpu" or the GPU (e.g. "CUDA0")
    gpu_layers: int
    n_layers: int
    memory_ram_bytes: int
    memory_vram_bytes: int


class LoadRequest(RequestBody):
    """POST /models/load and /models/unload, as llama-server's router mode takes them."""

    model: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


