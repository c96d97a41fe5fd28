"""The wire objects of OpenAI's text completions (POST /v1/completions)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, StrictInt, field_validator

from server.api.protocol.common import MAX_PROMPTS, CompletionUsage, GenerationBody
from server.api.protocol.openai_logprobs import MAX_TOP_LOGPROBS, CompletionLogprobs
from server.engine.base import TokenIds


class CompletionRequest(GenerationBody):
    # One prompt, or a batch: strings, or token ids (read as they are, without a BOS).
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    best_of: int | None = Field(None, strict=True)
    echo: bool = Field(False, strict=True)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, strict=True)
    # OpenAI's default for this endpoint; null: the server's default (GGSERVE_DEFAULT_MAX_TOKENS)
    max_tokens: int | None = Field(16, ge=0, strict=True)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: str | list[Any]) -> str | list[Any]:
        if isinstance(value, list):
            if not value or any(isinstance(p, list) and not p for p in value):
                raise ValueError("the prompt is empty: send text or at least one token id")
            if len(value) > MAX_PROMPTS and not isinstance(value[0], int):
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
        return value

    def prompts(self) -> list[str | TokenIds]:
        """Each prompt of the batch: text, or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [tuple(p for p in self.prompt if isinstance(p, int))]
        return [p if isinstance(p, str) else tuple(p) for p in self.prompt
                if not isinstance(p, int)]

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def _output_options(self) -> dict[str, Any]:
        return {"logprobs": self.logprobs, "echo": self.echo,
                "prompt_logprobs": self.logprobs if self.echo else None}

    def _refused(self) -> list[tuple[str, Any, tuple[Any, ...]]]:
        return [("best_of", self.best_of, (None, 1)), ("suffix", self.suffix, (None, ""))]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None
    system_fingerprint: str | None = None


