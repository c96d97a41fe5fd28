"""Pydantic mirrors of OpenAI's chat completion objects, fields in the API reference's order."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.api.protocol.common import CompletionUsage, GenerationBody
from server.api.protocol.openai_logprobs import MAX_TOP_LOGPROBS, ChoiceLogprobs
from server.errors import InvalidRequest
from server.settings import Settings


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text


class ChatCompletionMessageToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ChatCompletionMessageToolCall] | None = None  # an assistant's calls
    tool_call_id: str | None = None  # a tool result: the call it answers

    @model_validator(mode="after")
    def _tool_result_names_its_call(self) -> Self:
        # Templates pair results with calls by this id; without it they render a broken turn.
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs 'tool_call_id': the id of the call it "
                             "answers")
        return self

    def as_template_input(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": content or ""}
        if self.name:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        reasoning = (self.model_extra or {}).get("reasoning_content")
        if isinstance(reasoning, str) and reasoning:
            message["reasoning_content"] = reasoning
        return message


class ChatCompletionRequest(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)
    max_tokens: int | None = Field(None, ge=1, strict=True)
    logprobs: bool | None = Field(None, strict=True)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, strict=True)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = Field(None, strict=True)
    # --- extension (llama-server's): "none" returns a reasoning model's raw text ---
    reasoning_format: Literal["none", "auto", "deepseek"] | None = None

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def check_limits(self, settings: Settings) -> None:
        super().check_limits(settings)
        if len(self.messages) > settings.max_messages:
            raise InvalidRequest(f"{len(self.messages)} messages; this server allows at most "
                                 f"{settings.max_messages}.", param="messages")

    def _output_options(self) -> dict[str, Any]:
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        return {"logprobs": (self.top_logprobs or 0) if self.logprobs else None}


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    # Left out when there are none, as OpenAI does.
    tool_calls: list[ChatCompletionMessageToolCall] | None = Field(
        None, exclude_if=lambda calls: calls is None)
    # --- extension (DeepSeek's, llama-server's): the rationale of a reasoning format ---
    reasoning_content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None


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
    delta: dict[str, Any]
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None
