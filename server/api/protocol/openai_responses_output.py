"""The Responses API's response object and output items (pydantic mirrors of OpenAI's, fields in
the API reference's order), built from a chat choice's deltas (server/chat/output.py) together
with the stream events that announce each step, so a streamed and a whole response agree.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field

from server.chat.output import Delta
from server.engine.base import FinishReason, Usage

Status = Literal["in_progress", "completed", "incomplete"]
Event = dict[str, Any]  # one stream event's payload; the stream adds its sequence_number


def new_id(prefix: str) -> str:
    """An id as OpenAI's look: `resp_…`, `msg_…`, `fc_…`, `rs_…`."""
    return f"{prefix}_{uuid.uuid4().hex}"


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str = ""
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str = ""


class OutputMessage(BaseModel):
    id: str = Field(default_factory=lambda: new_id("msg"))
    type: Literal["message"] = "message"
    status: Status = "in_progress"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText] = Field(default_factory=list)


class ReasoningItem(BaseModel):
    id: str = Field(default_factory=lambda: new_id("rs"))
    type: Literal["reasoning"] = "reasoning"
    status: Status = "in_progress"
    summary: list[Any] = Field(default_factory=list)  # no summaries: the rationale is content
    content: list[ReasoningText] = Field(default_factory=list)


class FunctionToolCall(BaseModel):
    id: str = Field(default_factory=lambda: new_id("fc"))
    type: Literal["function_call"] = "function_call"
    status: Status = "in_progress"
    call_id: str
    name: str
    arguments: str = ""  # JSON text


OutputItem = OutputMessage | ReasoningItem | FunctionToolCall


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0  # not counted apart from output_tokens


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int

    @classmethod
    def of(cls, usage: Usage) -> ResponseUsage:
        return cls(input_tokens=usage.prompt_tokens,
                   input_tokens_details=InputTokensDetails(cached_tokens=usage.cached_tokens),
                   output_tokens=usage.completion_tokens,
                   output_tokens_details=OutputTokensDetails(), total_tokens=usage.total_tokens)


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    code: str
    message: str


class Response(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"] = "in_progress"
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: dict[str, Any] | None = None
    store: bool = True
    temperature: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_p: float | None = None
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)

    def finished(self, output: list[OutputItem], usage: Usage, reason: FinishReason) -> Response:
        """This response, done: `incomplete` when the output cap cut it short."""
        cut = reason == "length"
        return self.model_copy(update={
            "status": "incomplete" if cut else "completed", "output": output,
            "incomplete_details": IncompleteDetails(reason="max_output_tokens") if cut else None,
            "usage": ResponseUsage.of(usage)})


class OutputBuilder:
    """A response's output items, built from a chat choice's deltas in order: a message for
    content, a reasoning item for a rationale, a function_call per tool call. `feed` and
    `finish` return the stream events that announce what they added."""

    def __init__(self) -> None:
        self.items: list[OutputItem] = []
        self._parts: list[str] = []  # the open item's text (or arguments) so far

    def feed(self, deltas: list[Delta]) -> list[Event]:
        events: list[Event] = []
        for delta in deltas:
            if "content" in delta:
                events += self._text(OutputMessage, delta["content"])
            elif "reasoning_content" in delta:
                events += self._text(ReasoningItem, delta["reasoning_content"])
            for part in delta.get("tool_calls", ()):
                events += self._call(part)
        return events

    def finish(self, reason: FinishReason) -> list[Event]:
        """Close the last item (`incomplete` when the output cap cut it); a reply with no
        output at all is an empty message, as clients expect one."""
        status: Status = "incomplete" if reason == "length" else "completed"
        events = self._close(status)
        if not self.items:
            events += self._open_item(OutputMessage()) + self._close(status)
        return events

    @property
    def _current(self) -> OutputItem | None:
        item = self.items[-1] if self.items else None
        return item if item is not None and item.status == "in_progress" else None

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.items[-1].id, "output_index": len(self.items) - 1}

    def _text(self, kind: type[OutputMessage | ReasoningItem], text: str) -> list[Event]:
        events: list[Event] = []
        if not isinstance(self._current, kind):
            events += self._close("completed") + self._open_item(kind())
        self._parts.append(text)
        if kind is OutputMessage:
            return [*events, {"type": "response.output_text.delta", **self._where(),
                              "content_index": 0, "delta": text, "logprobs": []}]
        return [*events, {"type": "response.reasoning_text.delta", **self._where(),
                          "content_index": 0, "delta": text}]

    def _call(self, part: dict[str, Any]) -> list[Event]:
        function = part.get("function", {})
        if "id" in part:  # a new call: its id and name come first, then its arguments
            return self._close("completed") + self._open_item(
                FunctionToolCall(call_id=part["id"], name=function.get("name", "")))
        arguments = function.get("arguments", "")
        if not arguments or not isinstance(self._current, FunctionToolCall):
            return []
        self._parts.append(arguments)
        return [{"type": "response.function_call_arguments.delta", **self._where(),
                 "delta": arguments}]

    def _open_item(self, item: OutputItem) -> list[Event]:
        self.items.append(item)
        self._parts = []
        events: list[Event] = [{"type": "response.output_item.added",
                                "output_index": len(self.items) - 1, "item": item.model_dump()}]
        part = OutputText() if isinstance(item, OutputMessage) \
            else ReasoningText() if isinstance(item, ReasoningItem) else None
        if part is not None:
            events.append({"type": "response.content_part.added", **self._where(),
                           "content_index": 0, "part": part.model_dump()})
        return events

    def _close(self, status: Status) -> list[Event]:
        item = self._current
        if item is None:
            return []
        text, where = "".join(self._parts), self._where()
        item.status = status
        if isinstance(item, FunctionToolCall):
            item.arguments = text
            events: list[Event] = [{"type": "response.function_call_arguments.done", **where,
                                    "arguments": text}]
        else:
            if isinstance(item, OutputMessage):
                item.content = [OutputText(text=text)]
                done: Event = {"type": "response.output_text.done", **where, "content_index": 0,
                               "text": text, "logprobs": []}
            else:
                item.content = [ReasoningText(text=text)]
                done = {"type": "response.reasoning_text.done", **where, "content_index": 0,
                        "text": text}
            events = [done,
                      {"type": "response.content_part.done", **where, "content_index": 0,
                       "part": item.content[0].model_dump()}]
        return [*events, {"type": "response.output_item.done",
                          "output_index": where["output_index"], "item": item.model_dump()}]
