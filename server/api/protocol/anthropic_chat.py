"""An Anthropic Messages request as the chat path's `ChatCompletionRequest` (what
server/api/conversation.py renders and generates), following llama-server's conversion
(tools/server/server-chat.cpp): text blocks become message text, `tool_use` blocks an
assistant's `tool_calls`, `tool_result` blocks `tool` messages that name their call by the id
the client sent back, so that the template sees one id in a call and in its result."""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import ValidationError

from server.api.protocol.anthropic import (
    ImageBlockParam,
    MessageCountTokensParams,
    MessageCreateParams,
    MessageParam,
    TextBlockParam,
    ThinkingBlockParam,
    ToolChoiceParam,
    ToolParam,
    ToolResultBlockParam,
    ToolUseBlockParam,
)
from server.api.protocol.openai_chat import ChatCompletionRequest
from server.errors import InvalidRequest

# Claude Code starts its system prompt with a billing line of `key=value;` fields whose stamps
# change between requests (`cch=`, and the `cc_version` suffix, which follows the first user
# message): it means nothing to a local model, and left in it would defeat prefix caching
# (llama.cpp PR 21793 neutralises it the same way). Text after the fields stays.
_BILLING_HEADER = re.compile(r"\Ax-anthropic-billing-header:(?:[ \t]*[\w.-]+=[^;\n]*;)*\s*")
# Blocks that only one side of the conversation writes.
_BLOCK_ROLES = {"tool_use": "assistant", "thinking": "assistant",
                "redacted_thinking": "assistant", "tool_result": "user"}


def chat_request(body: MessageCountTokensParams) -> ChatCompletionRequest:
    """The chat request `body` is: its prompt, and its generation fields for /v1/messages
    (count_tokens has none)."""
    messages = [{"role": "system", "content": system}] if (
        system := _system_text(body.system)) else []
    for i, message in enumerate(body.messages):
        messages += _chat_messages(message, f"messages.{i}")
    if body.messages[-1].role == "assistant":
        raise InvalidRequest("A final assistant message (a prefill to continue) is not "
                             "supported: end the messages with a user turn.",
                             param=f"messages.{len(body.messages) - 1}")
    tools = [_chat_tool(tool, f"tools.{i}") for i, tool in enumerate(body.tools or [])]
    serial = body.tool_choice and body.tool_choice.disable_parallel_tool_use
    fields = _generation_fields(body) if isinstance(body, MessageCreateParams) else {}
    try:
        return ChatCompletionRequest.model_validate({
            "model": body.model, "messages": messages, "tools": tools or None,
            "tool_choice": _chat_tool_choice(body.tool_choice),
            "parallel_tool_calls": False if serial else None, **fields})
    except ValidationError as exc:  # what only the converted request can check
        raise InvalidRequest(str(exc.errors()[0]["msg"]), param="messages") from exc


def _generation_fields(body: MessageCreateParams) -> dict[str, Any]:
    fmt = body.output_config.format if body.output_config else None
    return {"max_tokens": body.max_tokens, "stop": body.stop_sequences, "stream": body.stream,
            "temperature": body.temperature, "top_k": body.top_k, "top_p": body.top_p,
            "response_format": None if fmt is None else {"type": "json_schema", "json_schema": {
                "name": "output", "schema": fmt.json_schema}}}


def _system_text(system: str | list[TextBlockParam] | None) -> str:
    texts = [system] if isinstance(system, str) else [b.text for b in system or []]
    return "\n\n".join(t for t in (_BILLING_HEADER.sub("", t, count=1) for t in texts) if t)


def _chat_messages(message: MessageParam, where: str) -> list[dict[str, Any]]:
    """One Anthropic message as chat messages: tool results first (as `tool` messages), then
    the turn's text, rationale and calls."""
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for j, block in enumerate(message.content):
        here = f"{where}.content.{j}"
        if message.role == "system" and not isinstance(block, TextBlockParam):
            raise InvalidRequest("A system message holds text blocks only, not "
                                 f"'{block.type}'.", param=here)
        if _BLOCK_ROLES.get(block.type, message.role) != message.role:
            raise InvalidRequest(f"A '{block.type}' block belongs in a "
                                 f"{_BLOCK_ROLES[block.type]} message, not a {message.role} "
                                 "message.", param=here)
        if isinstance(block, TextBlockParam):
            texts.append(block.text)
        elif isinstance(block, ThinkingBlockParam):
            reasoning.append(block.thinking)
        elif isinstance(block, ToolUseBlockParam):
            calls.append({"id": block.id, "type": "function", "function": {
                "name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}})
        elif isinstance(block, ToolResultBlockParam):
            results.append({"role": "tool", "tool_call_id": block.tool_use_id,
                            "content": _result_text(block, here)})
        elif isinstance(block, ImageBlockParam):
            raise _not_text(block, here)
        # redacted_thinking: Anthropic's encrypted rationale, which no other model can read
    turn: dict[str, Any] = {"role": message.role, "content": "\n\n".join(texts)}
    if calls:
        turn["tool_calls"] = calls
    if reasoning:
        turn["reasoning_content"] = "".join(reasoning)
    return results + ([turn] if texts or calls or reasoning else [])


def _result_text(block: ToolResultBlockParam, where: str) -> str:
    parts = [block.content] if isinstance(block.content, str) else []
    for k, part in enumerate(block.content if isinstance(block.content, list) else []):
        if isinstance(part, ImageBlockParam):
            raise _not_text(part, f"{where}.content.{k}")
        parts.append(part.text)
    text = "\n\n".join(parts)
    return f"Error: {text}" if block.is_error else text


def _not_text(block: ImageBlockParam, where: str) -> InvalidRequest:
    return InvalidRequest(f"'{block.type}' blocks are not supported: the models this server "
                          "runs read text only. Send the content as text blocks.", param=where)


def _chat_tool(tool: ToolParam, where: str) -> dict[str, Any]:
    if tool.type not in (None, "custom"):
        raise InvalidRequest(f"The tool type '{tool.type}' is one of Anthropic's server tools, "
                             "which this server does not run: send client tools (name, "
                             "description, input_schema).", param=f"{where}.type")
    if tool.input_schema is None:
        raise InvalidRequest("A tool needs 'input_schema': the JSON Schema of its input.",
                             param=f"{where}.input_schema")
    return {"type": "function", "function": {
        "name": tool.name, "description": tool.description, "parameters": tool.input_schema,
        "strict": bool(tool.strict)}}


def _chat_tool_choice(choice: ToolChoiceParam | None) -> Any:
    if choice is None:
        return None
    if choice.type == "tool":
        if not choice.name:
            raise InvalidRequest("tool_choice of type 'tool' needs the 'name' of the tool.",
                                 param="tool_choice.name")
        return {"type": "function", "function": {"name": choice.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]
