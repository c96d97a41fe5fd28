"""A chat choice's output text → the deltas OpenAI's chat API sends: reasoning, content and
tool calls. Streamed and whole responses go through the same shaping, so they always agree."""

from __future__ import annotations

from typing import Any

from server.chat.calls import CallParser, Content, Item, ToolCall
from server.chat.families.reasoning import Part, Reasoning, ReasoningSplitter
from server.chat.tools import ToolPlan

Delta = dict[str, Any]


class ChoiceOutput:
    """Shapes one choice's text: the rationale of a reasoning format as `reasoning_content`,
    tool calls (when the request offers tools) in the plan's family format as `tool_calls`,
    the rest as `content`."""

    def __init__(self, reasoning: Reasoning | None, plan: ToolPlan | None) -> None:
        self._splitter = ReasoningSplitter(reasoning) if reasoning else None
        self._parser = CallParser(plan.family.syntax, plan.schemas(), plan.family.make_id) \
            if plan else None
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

    def _content(self, items: list[Item]) -> list[Delta]:
        deltas: list[Delta] = []
        for item in items:
            if isinstance(item, ToolCall):
                deltas += self._call(item)
            elif isinstance(item, Content) and item.text:
                deltas.append({"content": item.text})
        return deltas

    def _call(self, call: ToolCall) -> list[Delta]:
        """A call as the SDK assembles it: id and name first, then the arguments."""
        index, self.calls = self.calls, self.calls + 1
        return [{"tool_calls": [{"index": index, "id": call.id, "type": "function",
                                 "function": {"name": call.name, "arguments": ""}}]},
                {"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]}]
