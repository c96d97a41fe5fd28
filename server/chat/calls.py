"""Model output → content and tool calls, also mid-stream, for any family's call syntax."""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.engine.textstream import partial_suffix

_ID_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, compact


@dataclass(frozen=True)
class Content:
    text: str


Item = Content | ToolCall
Schemas = dict[str, dict[str, Any]]  # function name → its parameters schema


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def short_call_id() -> str:
    """Nine letters and digits: Mistral's templates refuse any other tool-call id."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))


def compact(arguments: dict[str, Any]) -> str:
    return json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))


class CallSyntax(Protocol):
    """How one family writes its calls: where a block opens, where it ends, what it holds."""

    @property
    def opens(self) -> tuple[str, ...]:
        """The texts that open a block."""

    @property
    def anywhere(self) -> bool:
        """Whether blocks may follow content; else only at the start of the reply."""

    @property
    def separators(self) -> str:
        """The characters dropped between and after calls."""

    def end(self, block: str) -> int | None:
        """The length of the complete block at the start of `block` (which starts with an
        opener), or None until it is complete."""

    def parse(self, block: str, schemas: Schemas, make_id: Callable[[], str]) \
            -> list[ToolCall] | None:
        """The calls of a block (maybe cut off at the end of output); None: it is no call."""


@dataclass
class CallParser:
    """Splits streamed model output into content text and tool calls.

    Text that could still open a block is held back, as is trailing whitespace: content that is
    only whitespace between or around calls is dropped. A block whose text is no call comes back
    as content, exactly.
    """

    syntax: CallSyntax
    schemas: Schemas = field(default_factory=dict)
    make_id: Callable[[], str] = new_call_id
    _buffer: str = ""
    _in_call: bool = False
    _after_call: bool = False  # separators here are dropped
    _called: bool = False
    _started: bool = False  # non-blank content came first: no block can open (`anywhere` off)
    _gap: str = ""  # whitespace dropped before the open block, restored if it is no call

    def feed(self, text: str) -> list[Item]:
        self._buffer += text
        items: list[Item] = []
        while True:
            if self._in_call:
                end = self.syntax.end(self._buffer)
                if end is None:
                    return items
                items += self._block(self._buffer[:end])
                self._buffer = self._buffer[end:]
                continue
            if self._after_call:
                self._buffer = self._buffer.lstrip(self.syntax.separators)
                self._after_call = not self._buffer
            start, held = self._find_open()
            if start < 0:
                ready = self._buffer[:len(self._buffer) - held].rstrip()
                self._buffer = self._buffer[len(ready):]
                self._started = self._started or bool(ready)
                return _merged(items, ready)
            before = self._buffer[:start].rstrip()
            self._gap = self._buffer[len(before):start]
            items = _merged(items, before)
            self._buffer = self._buffer[start:]
            self._in_call = True

    def flush(self) -> list[Item]:
        """What is left at the end of generation; a cut-off call counts if it parses."""
        rest, self._buffer = self._buffer, ""
        if self._in_call:
            return self._block(rest)
        if not self._called:  # a plain reply keeps its text exactly
            return [Content(rest)] if rest else []
        return _merged([], rest.rstrip())

    def _find_open(self) -> tuple[int, int]:
        """Where a block opens in the buffer (-1: nowhere yet), and how much text to hold."""
        if not self.syntax.anywhere and (self._started and not self._called):
            return -1, 0
        text = self._buffer
        if not self.syntax.anywhere and not self._called:
            text = text.lstrip()  # only at the start of the reply
            offset = len(self._buffer) - len(text)
            for opener in self.syntax.opens:
                if text.startswith(opener):
                    return offset, 0
            if any(opener.startswith(text) for opener in self.syntax.opens):
                return -1, len(text)
            return -1, 0
        found = [i for i in (text.find(o) for o in self.syntax.opens) if i >= 0]
        if found:
            return min(found), 0
        return -1, max(partial_suffix(text, o) for o in self.syntax.opens)

    def _block(self, block: str) -> list[Item]:
        self._in_call = False
        calls = self.syntax.parse(block, self.schemas, self.make_id)
        if not calls:
            self._after_call = False
            self._started = True
            return [Content(self._gap + block)]
        self._after_call = self._called = True
        return list(calls)


def _merged(items: list[Item], text: str) -> list[Item]:
    if not text:
        return items
    if items and isinstance(items[-1], Content):
        return [*items[:-1], Content(items[-1].text + text)]
    return [*items, Content(text)]


def json_end(text: str, start: int = 0) -> int | None:
    """The end of the JSON object or array that starts at `start`, or None if it is cut off."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def call_from_json(data: Any, make_id: Callable[[], str], arguments_key: str = "arguments") \
        -> ToolCall | None:
    """A call from `{"name": ..., "arguments": {...}}` (arguments maybe a JSON string)."""
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get(arguments_key, data.get("arguments", data.get("parameters", {})))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(make_id(), data["name"], compact(arguments))
