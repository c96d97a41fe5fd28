"""Pydantic mirrors of Anthropic's Messages API (POST /v1/messages and
/v1/messages/count_tokens; names as the `anthropic` SDK's types) and its error envelope.
A request becomes the chat path's `ChatCompletionRequest` in anthropic_chat.py."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.api.protocol.common import MAX_STOP_STRINGS, RequestBody
from server.engine.base import Usage as EngineUsage


class _Block(BaseModel):
    # `cache_control` (prefix caching is automatic here) and `citations` change nothing in
    # this server; they are accepted so that requests written for Anthropic's API work.
    model_config = ConfigDict(extra="ignore")


class TextBlockParam(_Block):
    type: Literal["text"]
    text: str


class ImageBlockParam(_Block):
    """An image or a document: refused when converted, with the reason."""

    type: Literal["image", "document"]


class ToolUseBlockParam(_Block):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str
    input: dict[str, Any]


class ToolResultBlockParam(_Block):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[Annotated[TextBlockParam | ImageBlockParam,
                                  Field(discriminator="type")]] = ""
    is_error: bool = Field(False, strict=True)


class ThinkingBlockParam(_Block):
    type: Literal["thinking"]
    thinking: str
    signature: str = ""


class RedactedThinkingBlockParam(_Block):
    type: Literal["redacted_thinking"]


ContentBlockParam = Annotated[
    TextBlockParam | ImageBlockParam | ToolUseBlockParam | ToolResultBlockParam
    | ThinkingBlockParam | RedactedThinkingBlockParam, Field(discriminator="type")]


class MessageParam(BaseModel):
    # "system": a mid-conversation system message (Anthropic's `mid-conversation-system`
    # beta, which Claude Code sends), text only; a system message at that place in the chat.
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlockParam]


class ToolParam(_Block):
    """A client tool; Anthropic's server tools (`web_search_…`, `bash_…`) are refused."""

    name: str
    description: str = ""
    input_schema: dict[str, Any] | None = None
    type: str | None = None  # "custom", or absent
    strict: bool = Field(False, strict=True)  # the input must follow input_schema exactly


class ToolChoiceParam(BaseModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None  # type "tool": the tool to call
    disable_parallel_tool_use: bool | None = Field(None, strict=True)


class ThinkingConfigParam(BaseModel):
    # The rationale is what the model writes; `budget_tokens` is not enforced apart from
    # max_tokens, which bounds the rationale and the answer together.
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = Field(None, ge=1, strict=True)


class JSONOutputFormatParam(BaseModel):
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema")


class OutputConfigParam(BaseModel):
    effort: str | None = None  # Claude's; accepted, no meaning for these models
    format: JSONOutputFormatParam | None = None  # the reply's text follows this schema


class MessageCountTokensParams(RequestBody):
    """The prompt of a request: what count_tokens counts and /v1/messages reads."""

    messages: list[MessageParam] = Field(min_length=1)
    model: str
    system: str | list[TextBlockParam] | None = None
    thinking: ThinkingConfigParam | None = None
    tool_choice: ToolChoiceParam | None = None
    tools: list[ToolParam] | None = None

    @property
    def shows_thinking(self) -> bool:
        """Whether a reasoning model's rationale is returned as `thinking` blocks (as for
        Claude, only when asked for; it is split from the answer either way)."""
        return self.thinking is not None and self.thinking.type != "disabled"


class MessageCreateParams(MessageCountTokensParams):
    max_tokens: int = Field(ge=1, strict=True)
    metadata: dict[str, Any] | None = None  # user_id: accepted, not used
    output_config: OutputConfigParam | None = None
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOP_STRINGS)
    stream: bool = Field(False, strict=True)
    temperature: float | None = Field(None, ge=0.0, le=1.0, strict=True)
    top_k: int | None = Field(None, ge=0, strict=True)
    top_p: float | None = Field(None, ge=0.0, le=1.0, strict=True)


# ---------------------------------------------------------------- responses ----------------


class Usage(BaseModel):
    """Anthropic's split: `input_tokens` were read, `cache_read_input_tokens` reused from a
    cached prefix; their sum is the prompt's length (what count_tokens says)."""

    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    input_tokens: int
    output_tokens: int

    @classmethod
    def of(cls, usage: EngineUsage) -> Usage:
        return cls(cache_read_input_tokens=usage.cached_tokens,
                   input_tokens=usage.prompt_tokens - usage.cached_tokens,
                   output_tokens=usage.completion_tokens)


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class Message(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[dict[str, Any]]  # text, thinking and tool_use blocks
    model: str
    stop_reason: StopReason | None
    stop_sequence: str | None = None
    usage: Usage


class MessageTokensCount(BaseModel):
    input_tokens: int


# ---------------------------------------------------------------- errors ------------------

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 503: "overloaded_error", 504: "timeout_error"}


def error_shape(status: int, body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's error envelope `body` as Anthropic's, its type from the status."""
    error = body["error"]
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    message, param = error["message"], error.get("param")
    if param and param not in message:  # Anthropic's envelope has no field that names it
        message = f"{param}: {message}"
    return {"type": "error", "error": {"type": kind, "message": message}}
