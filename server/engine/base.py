"""The engine interface the API layer talks to, and the types that cross it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from server.prompts import Prompt

if TYPE_CHECKING:
    from server.registry import Registry

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token; temperature 0 means greedy."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logit_bias: Mapping[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to continue `n` times; `max_tokens` None means up to the context's end."""

    model: str
    prompt: Prompt
    sampling: SamplingParams = SamplingParams()
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    keep_alive: float | None = None  # seconds the model stays loaded after this request


@dataclass(frozen=True)
class TextDelta:
    """New output text of choice `index` (never a partial UTF-8 character or stop string)."""

    index: int
    text: str


@dataclass(frozen=True)
class ChoiceFinished:
    index: int
    reason: FinishReason


@dataclass(frozen=True)
class Usage:
    """Sent once, last: exact token counts of the whole request."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


Event = TextDelta | ChoiceFinished | Usage


@dataclass(frozen=True)
class ModelInfo:
    """What the API layer needs to know about a loaded model to build prompts."""

    id: str
    n_ctx: int
    chat_template: str | None
    bos_token: str
    eos_token: str


ModelState = Literal["available", "downloading", "loading", "loaded", "failed"]


@dataclass(frozen=True)
class ModelStatus:
    """Where a registry model stands: on disk or not, loading, loaded (and where), or failed."""

    state: ModelState
    error: str | None = None  # why the last load failed
    downloaded: int | None = None  # bytes so far, while downloading
    download_size: int | None = None
    n_ctx: int | None = None
    device: str = "cpu"  # "cpu", or the GPU backend's name (e.g. "CUDA0")
    gpu_layers: int = 0
    n_layer: int = 0
    memory_ram: int = 0  # bytes this model takes, when loaded
    memory_vram: int = 0


class GenerationStream(Protocol):
    """The events of one admitted request; `cancel()` stops its generation at the next step."""

    def __aiter__(self) -> AsyncIterator[Event]: ...

    def cancel(self) -> None: ...


class Engine(Protocol):
    """What the API layer may ask of an engine: start, stop, describe models, generate."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def loaded(self) -> list[str]: ...

    def overloaded(self) -> bool: ...

    async def model_info(self, model: str) -> ModelInfo: ...

    def status(self, model: str) -> ModelStatus:
        """Where registry entry `model` stands now."""
        ...

    async def load(self, model: str) -> ModelStatus:
        """Load `model` now (downloading it first if needed)."""
        ...

    async def unload(self, model: str) -> ModelStatus:
        """Unload `model` now, or once its running requests finish."""
        ...

    async def use_registry(self, registry: Registry) -> None:
        """Serve from `registry` from now on; loaded models it changed or dropped unload."""
        ...

    async def generate(self, request: GenerationRequest) -> GenerationStream:
        """Admit `request` (raising typed errors before any output) and return its events."""
        ...
