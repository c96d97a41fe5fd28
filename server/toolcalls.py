"""Model output → content and tool calls, for the Hermes `<tool_call>` format (see tools.py)."""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass

from server.engine.textstream import partial_suffix

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_ID_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, compact


@dataclass(frozen=True)
class Content:
    text: str


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


class ToolCallParser:
    """Splits streamed model output into content text and tool calls.

    Text that could still become "<tool_call>" is held back, as is trailing whitespace: content
    that is only whitespace between or around calls is dropped. A block becomes one ToolCall
    when "</tool_call>" arrives; one whose JSON is not a call comes back as content.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._in_call = False
        self._after_call = False  # whitespace here is dropped
        self._called = False
        self._gap = ""  # whitespace dropped before the open block, restored if it is no call

    def feed(self, text: str) -> list[Content | ToolCall]:
        self._buffer += text
        items: list[Content | ToolCall] = []
        while True:
            if self._in_call:
                end = self._buffer.find(CLOSE)
                if end < 0:
                    return items
                items.append(self._block(self._buffer[:end], closed=True))
                self._buffer = self._buffer[end + len(CLOSE):]
                continue
            if self._after_call:
                self._buffer = self._buffer.lstrip()
                self._after_call = not self._buffer
            start = self._buffer.find(OPEN)
            if start < 0:
                held = partial_suffix(self._buffer, OPEN)
                ready = self._buffer[:len(self._buffer) - held].rstrip()
                self._buffer = self._buffer[len(ready):]
                return _merged(items, ready)
            before = self._buffer[:start].rstrip()
            self._gap = self._buffer[len(before):start]
            items = _merged(items, before)
            self._buffer = self._buffer[start + len(OPEN):]
            self._in_call = True

    def flush(self) -> list[Content | ToolCall]:
        """What is left at the end of generation; an unterminated call counts if it parses."""
        rest, self._buffer = self._buffer, ""
        if self._in_call:  # cut off, perhaps inside "</tool_call>"
            return [self._block(rest[:len(rest) - partial_suffix(rest, CLOSE)], closed=False)]
        if not self._called:  # a plain reply keeps its text exactly
            return [Content(rest)] if rest else []
        return _merged([], rest.rstrip())

    def _block(self, body: str, *, closed: bool) -> Content | ToolCall:
        self._in_call = False
        call = _parse_call(body)
        if call is None:
            self._after_call = False
            return Content(self._gap + OPEN + body + (CLOSE if closed else ""))
        self._after_call = self._called = True
        return call


def _parse_call(body: str) -> ToolCall | None:
    try:
        data = json.loads(body)
        arguments = data.get("arguments", data.get("parameters", {}))
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
    except (ValueError, AttributeError):
        return None
    if not isinstance(data.get("name"), str) or not isinstance(arguments, dict):
        return None
    compact = json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))
    return ToolCall(new_call_id(), data["name"], compact)


def _merged(items: list[Content | ToolCall], text: str) -> list[Content | ToolCall]:
    if not text:
        return items
    if items and isinstance(items[-1], Content):
        return [*items[:-1], Content(items[-1].text + text)]
    return [*items, Content(text)]
