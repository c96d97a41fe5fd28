"""A chat choice's output text → the deltas OpenAI's chat API sends: reasoning, content and
tool calls. Streamed and whole responses go through the same shaping, so they always agree."""

from __future__ import annotations

from typing import Any

from server.api.chat_schemas import (
    ChatCompletionMessage,
    ChatCompletionMessageToolCall,
    FunctionCall,
)
from server.reasoning import Part, ReasoningSplitter
from server.tools import ToolCall, ToolCallParser

Delta = dict[str, Any]


class ChoiceOutput:
    """Shapes one choice's text: the rationale of a reasoning format as `reasoning_content`,
    tool calls (when the request offers tools) as `tool_calls`, the rest as `content`."""

    def __init__(self, separator: str | None, tools: bool) -> None:
        self._splitter = ReasoningSplitter(separator) if separator else None
        self._parser = ToolCallParser() if tools else None
        self.calls = 0

    def feed(self, text: str) -> list[Delta]:
        parts: list[Part] = self._splitter.feed(text) if self._splitter else [("content", text)]
        return self._shape(parts, final=False)

    def flush(self) -> list[Delta]:
        return self._shape(self._splitter.flush() if self._splitter else [], final=True)

    def _shape(self, parts: list[Part], final: bool) -> list[Delta]:
        deltas: list[Delta] = []
        for kind, text in parts:
            if kind == "content" and self._parser is not None:
                deltas += self._content(self._parser.feed(text))
            elif text:
                deltas.append({kind: text})
        if final and self._parser is not None:
            deltas += self._content(self._parser.flush())
        return deltas

    def _content(self, items: list[Any]) -> list[Delta]:
        deltas: list[Delta] = []
        for item in items:
            if isinstance(item, ToolCall):
                deltas += self._call(item)
            elif (text := getattr(item, "text", item)):
                deltas.append({"content": text})
        return deltas

    def _call(self, call: ToolCall) -> list[Delta]:
        """A call as the SDK assembles it: id and name first, then the arguments."""
        index, self.calls = self.calls, self.calls + 1
        return [{"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                 "function": {"name": call.name, "arguments": ""}}]},
                {"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]}]


def assemble(deltas: list[Delta]) -> ChatCompletionMessage:
    """The whole message the deltas of one choice add up to."""
    content: list[str] = []
    reasoning: list[str] = []
    calls: dict[int, dict[str, str]] = {}
    for delta in deltas:
        content.append(delta.get("content", ""))
        reasoning.append(delta.get("reasoning_content", ""))
        for part in delta.get("tool_calls", []):
            call = calls.setdefault(part["index"], {"id": "", "name": "", "arguments": ""})
            call["id"] = part.get("id", call["id"])
            call["name"] = part.get("function", {}).get("name", call["name"])
            call["arguments"] += part.get("function", {}).get("arguments", "")
    tool_calls = [ChatCompletionMessageToolCall(
        id=c["id"], function=FunctionCall(name=c["name"], arguments=c["arguments"]))
        for _, c in sorted(calls.items())] or None
    text = "".join(content)
    return ChatCompletionMessage(
        content=text if text or not tool_calls else None, tool_calls=tool_calls,
        reasoning_content="".join(reasoning) or None)
