"""A chat choice's deltas (see server/chat/output.py) → the whole message of a response."""

from __future__ import annotations

from server.api.protocol.openai_chat import (
    ChatCompletionMessage,
    ChatCompletionMessageToolCall,
    FunctionCall,
)
from server.chat.output import Delta


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
