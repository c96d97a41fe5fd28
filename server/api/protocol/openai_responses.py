"""OpenAI's Responses API request (POST /v1/responses), mirrored in pydantic, and its conversion
to a chat request: the Responses API is the chat API in other words.

`input` items become chat messages (a function_call an assistant's tool call, a
function_call_output a tool message; reasoning items are dropped), `instructions` a system
message, function tools chat tools, `text.format` a `response_format`. Tools of other types
(web_search, file_search, local_shell, shell, custom, mcp, computer, image_generation, ...) are
skipped: this server runs no hosted tools, and clients such as Codex CLI send them with every
request. Errors name this API's fields (`input.2.content.0`, `text.format.schema`, `tools[3].name`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator

from server.api.protocol.common import RequestBody
from server.api.protocol.openai_chat import (
    ChatCompletionMessageToolCall,
    ChatCompletionRequest,
    ChatMessage,
    FunctionCall,
)
from server.errors import InvalidRequest

log = logging.getLogger("server.requests")
ROLES = ("user", "system", "developer", "assistant")
# A chat error's param → this API's field (a prefix; the rest of the path is kept).
_RENAMED = (("response_format.json_schema", "text.format"), ("response_format", "text.format"),
            ("max_completion_tokens", "max_output_tokens"), ("max_tokens", "max_output_tokens"),
            ("messages", "input"))
_TOOL_PARAM = re.compile(r"tools\[(\d+)\](?:\.function)?(.*)", re.DOTALL)


class ResponsesRequest(RequestBody):
    """POST /v1/responses, fields in the API reference's order."""

    model: str
    input: str | list[Any]
    background: bool | None = Field(None, strict=True)  # refused when true
    conversation: Any = None  # refused: there is no Conversations API here
    include: list[str] | None = None  # accepted; nothing extra is ever included
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1, strict=True)
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = Field(None, strict=True)
    previous_response_id: str | None = None
    prompt: Any = None  # refused: there are no stored prompt templates here
    reasoning: dict[str, Any] | None = None  # accepted and echoed; effort changes nothing
    store: bool = Field(True, strict=True)
    stream: bool = Field(False, strict=True)
    temperature: float | None = Field(None, ge=0.0, le=2.0, strict=True)
    text: dict[str, Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    tools: list[Any] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20, strict=True)  # refused above 0
    top_p: float | None = Field(None, ge=0.0, le=1.0, strict=True)
    user: str | None = None

    # Shapes checked before the union's, so that an error names the field, not a union member.
    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, value: Any) -> Any:
        if not isinstance(value, str | list):
            raise ValueError("must be a string or a list of items")
        return value

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice_shape(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str | dict):
            raise ValueError("must be a string or an object")
        return value

    def to_chat(self, earlier: Sequence[ChatMessage] = ()) -> ChatCall:
        """The chat request this asks for, after the conversation `earlier` (that of
        `previous_response_id`); InvalidRequest names this API's field."""
        self._refuse_unsupported()
        turn = input_messages(self.input)
        system = [ChatMessage(role="system", content=self.instructions)] \
            if self.instructions else []
        messages = [*system, *earlier, *turn]
        if not messages:
            raise InvalidRequest("input holds no message: send text or at least one item.",
                                 param="input")
        functions, index = function_tools(self.tools or [])
        request = ChatCompletionRequest(
            model=self.model, messages=messages, max_completion_tokens=self.max_output_tokens,
            temperature=self.temperature, top_p=self.top_p,
            tools=[_chat_tool(tool) for tool in functions] or None,
            tool_choice=_chat_tool_choice(self.tool_choice),
            parallel_tool_calls=self.parallel_tool_calls,
            response_format=_response_format(self.text), stream=self.stream, user=self.user)
        return ChatCall(request, tuple(turn), functions, index)

    def echo(self, call: ChatCall) -> dict[str, Any]:
        """The request's settings as a response object repeats them."""
        return {"instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
                "parallel_tool_calls": self.parallel_tool_calls is not False,
                "previous_response_id": self.previous_response_id,
                "reasoning": self.reasoning, "store": self.store,
                "temperature": self.temperature,
                "text": self.text or {"format": {"type": "text"}},
                "tool_choice": self.tool_choice or "auto", "tools": call.tools,
                "top_p": self.top_p, "user": self.user, "metadata": self.metadata or {}}

    def _refuse_unsupported(self) -> None:
        for name, value, allowed in (("background", self.background, (None, False)),
                                     ("conversation", self.conversation, (None,)),
                                     ("prompt", self.prompt, (None,)),
                                     ("top_logprobs", self.top_logprobs, (None, 0))):
            if value not in allowed:
                raise InvalidRequest(f"'{name}' is not supported by this server (got "
                                     f"{json.dumps(value)}); remove it from the request.",
                                     param=name)


@dataclass(frozen=True)
class ChatCall:
    """A Responses request as a chat request, and what its response needs of the conversion."""

    request: ChatCompletionRequest
    turn: tuple[ChatMessage, ...]  # this request's input as chat messages (no instructions)
    tools: list[dict[str, Any]]  # the function tools, as the request gave them
    tool_index: tuple[int, ...]  # chat tool i is the request's tools[tool_index[i]]

    def param(self, chat_param: str | None) -> str | None:
        """The field of this API that a chat request's error names."""
        if chat_param is None:
            return None
        if (match := _TOOL_PARAM.fullmatch(chat_param)) and int(match[1]) < len(self.tool_index):
            return f"tools[{self.tool_index[int(match[1])]}]{match[2]}"
        for old, new in _RENAMED:
            if chat_param == old or chat_param.startswith((old + ".", old + "/", old + "[")):
                return new + chat_param[len(old):]
        return chat_param


# ---------------------------------------------------------------- input items -------------

ItemConverter = Callable[[dict[str, Any], str, list[ChatMessage]], None]


def input_messages(value: str | list[Any]) -> list[ChatMessage]:
    """`input` as chat messages: a string is one user message; items convert by type (a
    message item may leave its type out)."""
    if isinstance(value, str):
        return [ChatMessage(role="user", content=value)]
    messages: list[ChatMessage] = []
    for i, item in enumerate(value):
        where = f"input.{i}"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where} must be an object (an input item).", param=where)
        kind = item.get("type", "message")
        convert = _ITEMS.get(kind) if isinstance(kind, str) else None
        if convert is None:
            raise InvalidRequest(
                f"{where} is an item of type {json.dumps(kind)}, which this server does not "
                "take: it runs function tools only. Send message, function_call, "
                "function_call_output or reasoning items.", param=f"{where}.type")
        convert(item, where, messages)
    return messages


def _message(item: dict[str, Any], where: str, out: list[ChatMessage]) -> None:
    role = item.get("role")
    if role not in ROLES:
        raise InvalidRequest(f"{where}.role must be one of {', '.join(ROLES)}; got "
                             f"{json.dumps(role)}.", param=f"{where}.role")
    text = _content_text(item.get("content"), f"{where}.content")
    last = out[-1] if out else None
    if role == "assistant" and last is not None and last.role == "assistant" \
            and not last.tool_calls:  # one reply's message items are one message
        last.content = f"{last.content or ''}{text}"
    else:
        out.append(ChatMessage(role=role, content=text))


def _function_call(item: dict[str, Any], where: str, out: list[ChatMessage]) -> None:
    call = ChatCompletionMessageToolCall(
        id=_string(item, "call_id", where),
        function=FunctionCall(name=_string(item, "name", where),
                              arguments=_string(item, "arguments", where)))
    last = out[-1] if out else None
    if last is not None and last.role == "assistant":  # the calls of the reply it follows
        last.tool_calls = [*(last.tool_calls or []), call]
    else:
        out.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))


def _function_call_output(item: dict[str, Any], where: str, out: list[ChatMessage]) -> None:
    call_id = _string(item, "call_id", where)
    output = item.get("output")
    text = output if isinstance(output, str) else _content_text(output, f"{where}.output")
    out.append(ChatMessage(role="tool", content=text, tool_call_id=call_id))


def _reasoning(item: dict[str, Any], where: str, out: list[ChatMessage]) -> None:
    """Dropped: a model's earlier rationale is not part of its next prompt."""


_ITEMS: dict[str, ItemConverter] = {
    "message": _message, "function_call": _function_call,
    "function_call_output": _function_call_output, "reasoning": _reasoning}


def _content_text(content: Any, where: str) -> str:
    """The text of a content string or list of text parts; other parts are refused."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where} must be a string or a list of content parts.",
                             param=where)
    texts = []
    for j, part in enumerate(content):
        here = f"{where}.{j}"
        kind = part.get("type") if isinstance(part, dict) else None
        key = "refusal" if kind == "refusal" else "text"
        if kind in ("input_text", "output_text", "refusal") and isinstance(part.get(key), str):
            texts.append(part[key])
        elif kind in ("input_image", "input_file", "input_audio"):
            raise InvalidRequest(f"{here} is an {kind} part: this server's models read text "
                                 "only; send input_text parts.", param=here)
        else:
            raise InvalidRequest(f"{here} must be a text part: {{\"type\": \"input_text\", "
                                 "\"text\": ...}.", param=here)
    return "".join(texts)


def _string(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise InvalidRequest(f"{where}.{key} must be a string.", param=f"{where}.{key}")
    return value


# ---------------------------------------------------------------- tools and format --------


def function_tools(tools: list[Any]) -> tuple[list[dict[str, Any]], tuple[int, ...]]:
    """The function tools of `tools` and their indexes; tools of other types are skipped."""
    kept, index, skipped = [], [], []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise InvalidRequest(f"tools[{i}] must be an object with a type.",
                                 param=f"tools[{i}]")
        if tool.get("type") == "function":
            kept.append(tool)
            index.append(i)
        else:
            skipped.append(str(tool.get("type")))
    if skipped:
        log.info("skipped tools this server does not run: %s", ", ".join(sorted(set(skipped))))
    return kept, tuple(index)


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {
        key: tool[key] for key in ("name", "description", "parameters", "strict")
        if tool.get(key) is not None}}


def _chat_tool_choice(choice: str | dict[str, Any] | None) -> Any:
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" \
            and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise InvalidRequest(
        'tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...} '
        f"(this server runs function tools only); got {json.dumps(choice)}.",
        param="tool_choice")


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise InvalidRequest('text.format must be an object: {"type": "text"}, '
                             '{"type": "json_object"} or {"type": "json_schema", ...}.',
                             param="text.format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise InvalidRequest("text.format of type json_schema needs 'schema': a JSON "
                                 "Schema object.", param="text.format.schema")
        return {"type": "json_schema", "json_schema": {
            "name": fmt.get("name") or "response", "schema": fmt["schema"],
            "strict": fmt.get("strict")}}
    raise InvalidRequest("text.format.type must be 'text', 'json_object' or 'json_schema'; "
                         f"got {json.dumps(kind)}.", param="text.format.type")
