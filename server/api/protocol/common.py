"""What the OpenAI dialects' wire objects share: the request base, the generation fields,
usage and the error shape (pydantic mirrors of OpenAI's, fields in the API reference's order).

Requests accept fields this server does not know (clients send many), as vLLM does: they are
logged and named in the `X-Ignored-Fields` response header. A known feature this server does
not implement is refused with a 400 by `unsupported()`, never silently ignored. Numeric and
boolean fields are strict: `"4"` is not a number.
"""

from __future__ import annotations

import logging
import re
from contextvars import ContextVar
from typing import Any, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    field_validator,
    model_validator,
)

from server.chat.template import Prompt
from server.durations import parse_duration
from server.engine.base import (
    GenerationRequest,
    Grammar,
    SamplingParams,
    TokenIds,
    Usage,
)
from server.errors import InvalidRequest
from server.grammar.json_schema import json_object_grammar, json_schema_grammar
from server.registry import ModelSpec
from server.settings import Settings

log = logging.getLogger("server.requests")
MAX_STOP_STRINGS = 16
MAX_PROMPTS = 128
MAX_TOKEN_ID = 2**31 - 1  # llama_token is an int32: a larger id would wrap to another token
# Set to a fresh list per request by the app's middleware, which names them in a header.
IGNORED_FIELDS: ContextVar[list[str] | None] = ContextVar("ignored_fields", default=None)
_SURROGATE = re.compile("[\ud800-\udfff]")
_MAX_REPORTED = 16  # unknown field names per header and log line: a body may hold thousands


class RequestBody(BaseModel):
    """A JSON request body: its text must be valid Unicode; unknown top-level fields are
    reported, not refused."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        # JSON may escape a lone UTF-16 surrogate ("\ud800"); Python reads it into a str that
        # no encoder takes, so it would fail deep in a tokenizer or a response as a 500.
        path = _lone_surrogate(data)
        if path is not None:
            where = f"'{path}'" if path else "the request body"
            raise InvalidRequest(f"Invalid value for {where}: it holds a lone UTF-16 surrogate "
                                 "(\\ud800-\\udfff), which is not valid Unicode text.",
                                 param=path or None)
        return data

    @model_validator(mode="after")
    def _report_unknown(self) -> Self:
        names = [printable(name) for name in self.model_extra or ()]
        if names:
            shown = names[:_MAX_REPORTED] + ([f"(+{len(names) - _MAX_REPORTED})"]
                                             if len(names) > _MAX_REPORTED else [])
            log.warning("ignored unknown request fields: %s", ", ".join(shown))
            reported = IGNORED_FIELDS.get()
            if reported is not None:
                reported[:] = shown
        return self


def printable(name: str) -> str:
    """`name` in printable ASCII, for a header or a log line (a client picks any field name;
    a control character in a header value makes the HTTP server drop the connection)."""
    escaped = name.encode("ascii", "backslashreplace").decode("ascii")
    return "".join(c if " " <= c <= "~" and c != "," else f"\\x{ord(c):02x}" for c in escaped)


def _lone_surrogate(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string (or key) in `value` holding a lone surrogate."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    items: Any = ()
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    for key, item in items:
        here = f"{path}.{printable(str(key))}" if path else printable(str(key))
        if isinstance(key, str) and _SURROGATE.search(key):
            return here
        if (found := _lone_surrogate(item, here)) is not None:
            return found
    return None


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, strict=True)


class GenerationBody(RequestBody):
    """Fields common to chat and text completions."""

    model: str
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, strict=True)
    logit_bias: dict[str, StrictFloat] | None = None
    n: int = Field(1, ge=1, le=128, strict=True)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, strict=True)
    response_format: dict[str, Any] | None = None
    seed: int | None = Field(None, strict=True)
    # ints: token ids (as llama-server's tokens)
    stop: str | list[str | StrictInt] | None = None
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, strict=True)
    top_p: float | None = Field(None, ge=0.0, le=1.0, strict=True)
    user: str | None = None
    # --- extensions (llama.cpp samplers, as llama-server and vLLM accept them) ---
    top_k: int | None = Field(None, ge=0, strict=True)
    min_p: float | None = Field(None, ge=0.0, le=1.0, strict=True)
    repeat_penalty: float | None = Field(None, gt=0.0, strict=True)
    stop_token_ids: list[StrictInt] | None = None  # as vLLM's
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
    def _stop_list(cls, value: str | list[str | int] | None) -> list[str | int] | None:
        stops: list[str | int] | None = [value] if isinstance(value, str) else value
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

    def to_generation(self, spec: ModelSpec, prompt: Prompt | TokenIds,
                      settings: Settings) -> GenerationRequest:
        """Engine parameters: what the request says, else the model's registry defaults, else
        the server's."""
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
        stops = self.stop or []
        cap = settings.max_tokens_limit
        # The registry's default counts as asked for (over the context: a 400); without one,
        # the server's default only caps a reply that otherwise runs to the context's end.
        wanted = pick(self._max_tokens(), d.max_tokens)
        if wanted is not None and cap is not None:
            wanted = min(wanted, cap)  # over the cap only when the registry set it: not a 400
        return GenerationRequest(
            model=spec.id, adapter=spec.served_adapter(self.model), prompt=prompt,
            sampling=sampling,
            max_tokens=wanted,
            default_max_tokens=min(settings.default_max_tokens, cap or MAX_TOKEN_ID),
            stop=tuple(s for s in stops if isinstance(s, str)),
            stop_tokens=tuple(s for s in stops if isinstance(s, int))
            + tuple(self.stop_token_ids or ()),
            n=self.n,
            keep_alive=None if self.keep_alive is None else float(self.keep_alive),
            grammar=self._grammar(), stream=self.stream, **self._output_options())

    def _output_options(self) -> dict[str, Any]:
        """Engine options an endpoint adds (log-probabilities, echo)."""
        return {}

    def _grammar(self) -> Grammar | None:
        """The grammar `response_format` asks for; None for free text."""
        fmt = self.response_format or {}
        kind = fmt.get("type", "text")
        if kind == "text":
            return None
        if kind == "json_object":
            return Grammar(json_object_grammar())
        if kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise InvalidRequest(
                    "response_format json_schema needs {'json_schema': {'name': ..., "
                    "'schema': {...}}}", param="response_format.json_schema")
            return Grammar(json_schema_grammar(spec["schema"]))
        raise InvalidRequest(f"response_format type {kind!r} is not one of 'text', "
                             "'json_object', 'json_schema'", param="response_format.type")

    def _token_bias(self) -> dict[int, float]:
        bias: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.isascii() or not key.isdigit():
                raise InvalidRequest(f"logit_bias keys must be token ids; got '{key}'",
                                     param="logit_bias")
            if int(key) > MAX_TOKEN_ID:  # the engine checks smaller ids against its vocabulary
                raise InvalidRequest(f"Token id {key} in logit_bias is not in this model's "
                                     "vocabulary.", param="logit_bias")
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


# ---------------------------------------------------------------- usage -------------------


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
