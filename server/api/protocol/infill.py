"""llama-server's fill-in-the-middle API (POST /infill) as editor plugins call it (llama.vim,
llama.vscode): the code before and after the cursor, repository context in `input_extra`, the
sampling fields of llama-server's /completion, and its reply (`content`, `timings`, ...).

Fields llama-server has and this server does not apply (`n_indent`, `t_max_prompt_ms`,
`t_max_predict_ms`, `samplers`, `cache_prompt`, `id_slot`) are accepted and named in the
`X-Ignored-Fields` header, as any unknown field is.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.api.protocol.common import MAX_STOP_STRINGS, RequestBody
from server.api.protocol.openai_completions import CompletionRequest
from server.engine.base import TokenIds

_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "repeat_penalty",
             "presence_penalty", "frequency_penalty", "stop", "stream", "keep_alive")


class InfillChunk(BaseModel):
    """A piece of repository context: a file's name and some of its text (llama.vim adds
    `time`, which is ignored)."""

    model_config = ConfigDict(extra="ignore")

    text: str
    filename: str = "tmp"  # llama-server's default


class InfillRequest(RequestBody):
    model: str | None = None  # default: the registry's default model
    input_prefix: str  # the code before the cursor
    input_suffix: str  # the code after the cursor
    input_extra: list[InfillChunk] = Field(default_factory=list)
    prompt: str = ""  # text that continues the prefix (llama.vim: the cursor line's start)
    n_predict: int | None = Field(None, ge=-1, strict=True)  # -1: no limit; 0: read only
    max_tokens: int | None = Field(None, ge=0, strict=True)  # as llama-server, for n_predict
    temperature: float | None = Field(None, ge=0.0, le=2.0, strict=True)
    top_k: int | None = Field(None, ge=0, strict=True)
    top_p: float | None = Field(None, ge=0.0, le=1.0, strict=True)
    min_p: float | None = Field(None, ge=0.0, le=1.0, strict=True)
    seed: int | None = Field(None, strict=True)
    repeat_penalty: float | None = Field(None, gt=0.0, strict=True)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, strict=True)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, strict=True)
    stop: list[str] | None = Field(None, max_length=MAX_STOP_STRINGS)
    stream: bool = Field(False, strict=True)
    keep_alive: float | str | None = None
    # The reply's fields to return, as "a/b" paths, each under its path as the key (llama.vim
    # asks for "content", "timings/prompt_n", ...).
    response_fields: list[str] | None = None

    @property
    def output_limit(self) -> int | None:
        """The tokens to generate at most (None: up to the server's default)."""
        limit = self.n_predict if self.n_predict is not None else self.max_tokens
        return None if limit is None or limit < 0 else limit

    def as_completion(self, model: str, prompt: TokenIds) -> CompletionRequest:
        """The text completion of `prompt` (the FIM tokens) that this request asks for."""
        fields = {name: getattr(self, name) for name in _SAMPLING
                  if getattr(self, name) is not None}
        return CompletionRequest.model_validate(
            {**fields, "model": model, "prompt": list(prompt), "max_tokens": self.output_limit})


class InfillTimings(BaseModel):
    """llama-server's `timings`: the prompt's tokens read (beyond those cached) and the time
    to the first output, then the output's tokens and the time after it."""

    cache_n: int
    prompt_n: int
    prompt_ms: float
    prompt_per_token_ms: float
    prompt_per_second: float
    predicted_n: int
    predicted_ms: float
    predicted_per_token_ms: float
    predicted_per_second: float

    @classmethod
    def of(cls, cached: int, prompt_n: int, prompt_s: float, predicted_n: int,
           predicted_s: float) -> InfillTimings:
        def per_token(seconds: float, n: int) -> float:
            return 1000 * seconds / n if n else 0.0

        def rate(seconds: float, n: int) -> float:
            return n / seconds if seconds > 0 else 0.0

        return cls(cache_n=cached, prompt_n=prompt_n, prompt_ms=1000 * prompt_s,
                   prompt_per_token_ms=per_token(prompt_s, prompt_n),
                   prompt_per_second=rate(prompt_s, prompt_n), predicted_n=predicted_n,
                   predicted_ms=1000 * predicted_s,
                   predicted_per_token_ms=per_token(predicted_s, predicted_n),
                   predicted_per_second=rate(predicted_s, predicted_n))


class InfillChunkReply(BaseModel):
    """One streamed piece of the middle."""

    index: int = 0
    content: str
    tokens: list[int] = Field(default_factory=list)
    stop: Literal[False] = False


class InfillResponse(BaseModel):
    """The whole reply (streamed: the last event, with empty `content`)."""

    index: int = 0
    content: str
    tokens: list[int] = Field(default_factory=list)
    stop: Literal[True] = True
    model: str
    tokens_predicted: int
    tokens_evaluated: int
    has_new_line: bool
    truncated: bool  # repository context was left out: it did not fit the context
    stop_type: Literal["eos", "word", "limit"]
    stopping_word: str
    tokens_cached: int
    timings: InfillTimings

    def fields(self, paths: list[str] | None) -> dict[str, Any]:
        """The reply as JSON, or only the values at `paths` ("timings/prompt_n": a nested
        field), each under its path, as llama-server's `response_fields` returns them."""
        whole = self.model_dump()
        if paths is None:
            return whole
        picked: dict[str, Any] = {}
        for path in paths:
            value: Any = whole
            for key in path.split("/"):
                if not isinstance(value, dict) or key not in value:
                    break
                value = value[key]
            else:
                picked[path] = value
        return picked
