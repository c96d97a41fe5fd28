"""Ollama's API (its docs/api.md): the chat and generate bodies, which convert themselves into
the OpenAI requests the chat and completion paths take (errors name Ollama's fields), NDJSON
lines, and Ollama's error shape. The model endpoints' objects are in ollama_models.py.

Ollama's `options` map onto the OpenAI sampling fields; the options that set how a model is
loaded (num_ctx, num_gpu, num_thread, ...) belong to models.yaml here, so a request's values are
accepted, reported in `X-Ignored-Fields` and not applied. Samplers this server lacks (mirostat,
tail-free, typical) are refused unless set to their "off" value.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from server.api.protocol.common import IGNORED_FIELDS, MAX_STOP_STRINGS, RequestBody
from server.api.protocol.openai_chat import ChatCompletionRequest
from server.api.protocol.openai_completions import CompletionRequest
from server.durations import parse_duration
from server.errors import InvalidRequest

OLLAMA_VERSION = "0.12.0"  # the Ollama release whose API this mirrors (clients check it)
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "repeat_penalty",
            "presence_penalty", "frequency_penalty", "stop")
# Samplers this server does not have, and the value that turns each off.
REFUSED_UNLESS = {"mirostat": 0, "tfs_z": 1.0, "typical_p": 1.0, "repeat_last_n": 64}
OpenAIRequest = TypeVar("OpenAIRequest", ChatCompletionRequest, CompletionRequest)


def timestamp() -> str:
    """Now, as Ollama writes `created_at` (RFC 3339, UTC)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ndjson(item: dict[str, Any] | BaseModel) -> bytes:
    """One NDJSON line."""
    text = item.model_dump_json(exclude_none=True) if isinstance(item, BaseModel) \
        else json.dumps(item, ensure_ascii=False, separators=(",", ":"))
    return text.encode() + b"\n"


def error_shape(status: int, body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's error envelope as Ollama's: {"error": "message"} (same status)."""
    return {"error": body["error"]["message"]}


class OllamaError(BaseModel):
    error: str


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": OllamaError, "description": why} for status, why in [
        (400, "Invalid request"), (401, "Missing or wrong API key"), (404, "Unknown model"),
        (415, "The body is not JSON"), (503, "Overloaded, or the model cannot load"),
        (504, "The request ran past its time limit")]}
# A generation's reply: one JSON object, or NDJSON lines while `stream` is true (the default).
STREAMED: dict[int | str, dict[str, Any]] = {200: {"content": {
    "application/json": {"schema": {"type": "object"}},
    "application/x-ndjson": {"schema": {"type": "string"}}}}, **ERRORS}


def keep_alive_seconds(value: float | str | None) -> float | None:
    return None if value is None else parse_duration(value)


class Options(BaseModel):
    """Ollama's `options`: sampling, output length, stop strings (and load settings, ignored)."""

    model_config = ConfigDict(extra="allow")

    temperature: float | None = Field(None, ge=0.0, le=2.0, strict=True)
    top_p: float | None = Field(None, ge=0.0, le=1.0, strict=True)
    top_k: int | None = Field(None, ge=0, strict=True)
    min_p: float | None = Field(None, ge=0.0, le=1.0, strict=True)
    seed: int | None = Field(None, strict=True)
    repeat_penalty: float | None = Field(None, gt=0.0, strict=True)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, strict=True)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, strict=True)
    num_predict: int | None = Field(None, ge=-2, strict=True)  # -1: no limit, -2: to the end
    stop: str | list[str] | None = None
    mirostat: int | None = Field(None, strict=True)
    tfs_z: float | None = Field(None, strict=True)
    typical_p: float | None = Field(None, strict=True)
    repeat_last_n: int | None = Field(None, strict=True)  # the penalties look back 64 tokens

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None and len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are accepted")
        return stops

    def openai_fields(self) -> dict[str, Any]:
        """The OpenAI request fields these options set; refuses samplers this server lacks."""
        for name, off in REFUSED_UNLESS.items():
            value = getattr(self, name)
            if value is not None and value != off:
                raise InvalidRequest(f"options.{name} is not supported by this server (got "
                                     f"{value!r}); leave it out or set it to {off!r}.",
                                     param=f"options.{name}")
        if self.num_predict == 0:
            raise InvalidRequest("options.num_predict 0 generates nothing: send at least 1, or "
                                 "-1 for no limit.", param="options.num_predict")
        fields = {name: getattr(self, name) for name in SAMPLING if getattr(self, name) is not None}
        if self.num_predict is not None and self.num_predict > 0:
            fields["max_tokens"] = self.num_predict
        return fields

    def ignored(self, everything: bool = False) -> list[str]:
        """The options set that this server does not apply per request (load settings; with
        `everything`, all of them)."""
        names = sorted(self.model_fields_set) if everything else list(self.model_extra or ())
        return [f"options.{name}" for name in names]

    def report_ignored(self, everything: bool = False) -> None:
        """Name the options not applied in the X-Ignored-Fields header."""
        reported = IGNORED_FIELDS.get()
        if reported is not None:
            reported += self.ignored(everything)


class OllamaBody(RequestBody):
    """What /api/chat and /api/generate share. Ollama streams unless `stream` is false."""

    model: str = Field(min_length=1)
    stream: bool = Field(True, strict=True)
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: Options | None = None
    keep_alive: float | str | None = None
    think: bool | Literal["low", "medium", "high"] | None = None
    logprobs: bool | None = Field(None, strict=True)
    top_logprobs: int | None = Field(None, strict=True)

    @field_validator("keep_alive")
    @classmethod
    def _keep_alive(cls, value: float | str | None) -> float | None:
        return keep_alive_seconds(value)

    def openai_fields(self, model: str) -> dict[str, Any]:
        """The fields of the OpenAI request for registry model `model`."""
        if self.logprobs or self.top_logprobs:
            name = "logprobs" if self.logprobs else "top_logprobs"
            raise InvalidRequest(f"'{name}' is not supported on /api (use /v1/chat/completions "
                                 "or /v1/completions for log-probabilities).", param=name)
        if isinstance(self.think, str):
            raise InvalidRequest("'think' levels are not supported: send true or false.",
                                 param="think")
        options = self.options or Options()
        options.report_ignored()
        return {"model": model, "stream": self.stream, "keep_alive": self.keep_alive,
                "response_format": self._response_format(), **options.openai_fields()}

    def _response_format(self) -> dict[str, Any] | None:
        if isinstance(self.format, dict):
            return {"type": "json_schema", "json_schema": {"name": "format",
                                                           "schema": self.format}}
        return {"type": "json_object"} if self.format == "json" else None


def openai_request(kind: type[OpenAIRequest], fields: dict[str, Any]) -> OpenAIRequest:
    """`fields` as `kind`; a value the OpenAI schema refuses is a 400 naming its field."""
    try:
        return kind.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        message = str(first["msg"]).removeprefix("Value error, ")
        raise InvalidRequest(f"Invalid value for '{param}': {message}.", param=param) from None


# ---------------------------------------------------------------- chat --------------------


class ToolCallFunction(BaseModel):
    name: str
    arguments: dict[str, Any] | str = Field(default_factory=dict)  # Ollama sends an object


class ToolCall(BaseModel):
    id: str | None = None
    function: ToolCallFunction


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    thinking: str | None = None
    images: list[Any] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None  # a tool result: the function it answers
    tool_call_id: str | None = None  # ... or the call, for clients that send one


class ChatRequest(OllamaBody):
    messages: list[Message] = Field(default_factory=list)  # none: load (or unload) the model
    tools: list[dict[str, Any]] | None = None

    def to_openai(self, model: str) -> ChatCompletionRequest:
        return openai_request(ChatCompletionRequest, {
            **self.openai_fields(model), "tools": self.tools or None,
            "messages": openai_messages(self.messages)})


def openai_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """OpenAI chat messages: calls get ids, and tool results the id of the call they answer
    (Ollama pairs them by function name, or by order)."""
    out: list[dict[str, Any]] = []
    waiting: list[tuple[str, str]] = []  # (call id, function) not answered yet
    for index, message in enumerate(messages):
        if message.images:
            raise InvalidRequest(f"'messages.{index}.images' is not supported: no model on this "
                                 "server takes images.", param=f"messages.{index}.images")
        item: dict[str, Any] = {"role": message.role, "content": message.content or ""}
        if message.thinking:
            item["reasoning_content"] = message.thinking
        if message.tool_calls:
            item["tool_calls"] = []
            for call in message.tool_calls:
                call_id = call.id or f"call_{len(out)}_{len(item['tool_calls'])}"
                waiting.append((call_id, call.function.name))
                arguments = call.function.arguments
                item["tool_calls"].append({"id": call_id, "type": "function", "function": {
                    "name": call.function.name, "arguments": arguments
                    if isinstance(arguments, str) else json.dumps(arguments)}})
        if message.role == "tool":
            item["tool_call_id"] = message.tool_call_id or _answered(waiting, message.tool_name,
                                                                      len(out))
            if message.tool_name:
                item["name"] = message.tool_name
        out.append(item)
    return out


def _answered(waiting: list[tuple[str, str]], name: str | None, position: int) -> str:
    """The id of the first unanswered call to `name` (any call when None), taken off the list."""
    for i, (call_id, function) in enumerate(waiting):
        if name is None or function == name:
            del waiting[i]
            return call_id
    return f"call_{position}"  # a result without its call: the template renders it alone


# ---------------------------------------------------------------- generate ----------------


class GenerateRequest(OllamaBody):
    prompt: str | None = ""  # empty: load (or unload) the model
    system: str | None = None
    raw: bool = Field(False, strict=True)  # true: the prompt as it is, no chat template
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[Any] | None = None

    def check(self) -> None:
        """Refuse what this server does not do, naming the field."""
        refused = [("suffix", "fill-in-the-middle is not supported"),
                   ("template", "the model's chat template (models.yaml) is the template"),
                   ("context", "send the conversation as messages to /api/chat instead"),
                   ("images", "no model on this server takes images")]
        for name, why in refused:
            if getattr(self, name):
                raise InvalidRequest(f"'{name}' is not supported: {why}.", param=name)
        if self.raw and self.system:
            raise InvalidRequest("'system' needs the chat template, which raw skips: put it in "
                                 "the prompt.", param="system")

    def messages(self) -> list[Message]:
        system = [Message(role="system", content=self.system)] if self.system else []
        return [*system, Message(role="user", content=self.prompt)]

    def to_openai(self, model: str) -> ChatCompletionRequest:
        return openai_request(ChatCompletionRequest, {
            **self.openai_fields(model), "messages": openai_messages(self.messages())})

    def to_completion(self, model: str) -> CompletionRequest:
        fields = self.openai_fields(model)
        return openai_request(CompletionRequest, {
            **fields, "max_tokens": fields.get("max_tokens"), "prompt": self.prompt or ""})


class VersionResponse(BaseModel):
    version: str = OLLAMA_VERSION
