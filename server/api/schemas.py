"""Pydantic mirrors of OpenAI's wire objects, fields in the API reference's order.

Requests accept fields this server does not know (clients send many), but a known feature it
does not implement is refused with a 400 by `unsupported()`, never silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.durations import parse_duration
from server.engine.base import GenerationRequest, ModelState, SamplingParams, Usage
from server.errors import InvalidRequest
from server.prompts import Prompt
from server.registry import ModelSpec
from server.settings import Settings

MAX_STOP_STRINGS = 16


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationRequest(_Request):
    """Fields common to chat and text completions."""

    model: str
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    n: int = Field(1, ge=1, le=128)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    user: str | None = None
    # --- extensions (llama.cpp samplers, as llama-server and vLLM accept them) ---
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(None, gt=0.0)
    # --- extension (as Ollama): how long the model stays loaded after this request ---
    keep_alive: float | str | None = Field(
        None, description="seconds or a duration ('5m'); -1 keeps the model loaded, 0 unloads "
                          "it after this request")

    @field_validator("keep_alive")
    @classmethod
    def _keep_alive(cls, value: float | str | None) -> float | None:
        return None if value is None else parse_duration(value)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None and len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are accepted")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _max_tokens(self) -> int | None:
        raise NotImplementedError

    def check_limits(self, settings: Settings) -> None:
        """Refuse what is over the operator's limits, naming the field and the limit."""
        wanted = self._max_tokens()
        cap = settings.max_tokens_limit
        if cap is not None and wanted is not None and wanted > cap:
            raise InvalidRequest(f"max_tokens is {wanted}; this server allows at most {cap}.",
                                 param="max_tokens")
        if self.n > settings.max_n:
            raise InvalidRequest(f"n is {self.n}; this server allows at most {settings.max_n}.",
                                 param="n")

    def to_generation(self, spec: ModelSpec, prompt: Prompt) -> GenerationRequest:
        """Engine parameters: what the request says, else the model's registry defaults."""
        self.unsupported()
        d = spec.sampling

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        sampling = SamplingParams(
            temperature=pick(self.temperature, d.temperature),
            top_p=pick(self.top_p, d.top_p),
            top_k=pick(self.top_k, d.top_k),
            min_p=pick(self.min_p, d.min_p),
            repeat_penalty=pick(self.repeat_penalty, d.repeat_penalty),
            presence_penalty=pick(self.presence_penalty, d.presence_penalty),
            frequency_penalty=pick(self.frequency_penalty, d.frequency_penalty),
            seed=self.seed,
            logit_bias=self._token_bias(),
        )
        return GenerationRequest(
            model=spec.id, prompt=prompt, sampling=sampling,
            max_tokens=pick(self._max_tokens(), d.max_tokens),
            stop=tuple(self.stop or ()), n=self.n,
            keep_alive=None if self.keep_alive is None else float(self.keep_alive))

    def _token_bias(self) -> dict[int, float]:
        bias: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.lstrip("-").isdigit() or int(key) < 0:
                raise InvalidRequest(f"logit_bias keys must be token ids; got '{key}'",
                                     param="logit_bias")
            if not -100 <= value <= 100:
                raise InvalidRequest(f"logit_bias values must be in [-100, 100]; got {value}",
                                     param="logit_bias")
            bias[int(key)] = value
        return bias

    def unsupported(self) -> None:
        """Refuse features this server does not implement yet, naming the field."""
        for name, value, allowed in self._refused():
            if value not in allowed:
                raise InvalidRequest(
                    f"'{name}' is not supported by this server yet (got {value!r}); "
                    "remove it from the request.", param=name)

    def _refused(self) -> list[tuple[str, Any, tuple[Any, ...]]]:
        return []


# ---------------------------------------------------------------- chat completions --------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message = {"role": "system" if self.role == "developer" else self.role,
                   "content": content or ""}
        if self.name:
            message["name"] = self.name
        reasoning = (self.model_extra or {}).get("reasoning_content")
        if isinstance(reasoning, str) and reasoning:
            message["reasoning_content"] = reasoning
        return message


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    # --- extension (llama-server's): "none" returns a reasoning model's raw text ---
    reasoning_format: Literal["none", "auto", "deepseek"] | None = None

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def check_limits(self, settings: Settings) -> None:
        super().check_limits(settings)
        if len(self.messages) > settings.max_messages:
            raise InvalidRequest(f"{len(self.messages)} messages; this server allows at most "
                                 f"{settings.max_messages}.", param="messages")

    def _refused(self) -> list[tuple[str, Any, tuple[Any, ...]]]:
        fmt = (self.response_format or {}).get("type")
        return [("logprobs", self.logprobs, (None, False)),
                ("top_logprobs", self.top_logprobs, (None, 0)),
                ("response_format", fmt, (None, "text")),
                ("tools", self.tools, (None, [])),
                ("tool_choice", self.tool_choice, (None, "none"))]


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    # --- extension (DeepSeek's, llama-server's): the rationale of a reasoning format ---
    reasoning_content: str | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionUsage(BaseModel):
    completion_tokens: int
    prompt_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, usage: Usage) -> CompletionUsage:
        return cls(completion_tokens=usage.completion_tokens, prompt_tokens=usage.prompt_tokens,
                   total_tokens=usage.total_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens))


class ChatChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage
    system_fingerprint: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: dict[str, str]
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None


# ---------------------------------------------------------------- text completions --------


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str]
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this endpoint
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("send one prompt per request (a string, or a list of one string)")
        return value

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def _refused(self) -> list[tuple[str, Any, tuple[Any, ...]]]:
        return [("best_of", self.best_of, (None, 1)), ("echo", self.echo, (False,)),
                ("logprobs", self.logprobs, (None,)), ("suffix", self.suffix, (None, ""))]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None
    system_fingerprint: str | None = None


# ---------------------------------------------------------------- models ------------------


class Model(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ggserve"
    # --- extensions: where the model stands in this server ---
    loaded: bool = False
    status: ModelState = "available"
    error: str | None = None  # why the last load failed
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


class LoadRequest(_Request):
    """POST /models/load and /models/unload, as llama-server's router mode takes them."""

    model: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Model]


# ---------------------------------------------------------------- errors ------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    # --- extensions (llama-server's), on context_length_exceeded only ---
    n_prompt_tokens: int | None = None
    n_ctx: int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": why} for status, why in [
        (400, "Invalid request"), (401, "Missing or wrong API key"),
        (404, "Unknown model"), (413, "Request body too large"),
        (503, "Overloaded, shutting down, or the model cannot load"),
        (504, "The request ran past its time limit")]}


def streamed(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses of a generation endpoint: JSON, or SSE when `stream` is true."""
    return {200: {"model": model, "content": {"text/event-stream": {
        "schema": {"type": "string"}}}}, **ERROR_RESPONSES}
