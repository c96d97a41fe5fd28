"""Mistral's `[TOOL_CALLS]` calls, in both generations:

- Mistral-Nemo, Mistral-7B v0.3: `[TOOL_CALLS][{"name": ..., "arguments": {...}, "id": "..."}]`
- Devstral, Mistral-Small 3.2, Ministral 3: `[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}` per call
  (`[CALL_ID]` only where the template has it).

Their templates refuse any tool-call id but nine letters and digits, so calls get such ids.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.chat.calls import Schemas, ToolCall, call_from_json, compact, json_end, short_call_id
from server.chat.families.base import Family, Functions
from server.grammar.calls import CallRules, require_functions

MARK = "[TOOL_CALLS]"
TRIGGER = r"\[TOOL_CALLS\]"
PRESERVED = (MARK, "[ARGS]", "[CALL_ID]")
_ID = re.compile(r"[A-Za-z0-9]{9}")
_ID_GBNF = '"\\"" [a-zA-Z0-9]{9} "\\""'
_HEAD = re.compile(r"\s*([A-Za-z0-9_-]+)(?:\[CALL_ID\]([A-Za-z0-9]*))?\[ARGS\]")


def _id(value: Any, make_id: Callable[[], str]) -> str:
    return value if isinstance(value, str) and _ID.fullmatch(value) else make_id()


@dataclass(frozen=True)
class ArraySyntax:
    """`[TOOL_CALLS]` and a JSON array of calls. The array alone also counts: llama.cpp drops
    the text of the control token `[TOOL_CALLS]` from output unless asked to keep it."""

    opens: tuple[str, ...] = (MARK, "[{")
    anywhere: bool = True
    separators: str = " \t\r\n"

    def end(self, block: str) -> int | None:
        start = block.find("[", len(MARK) if block.startswith(MARK) else 0)
        return None if start < 0 else json_end(block, start)

    def parse(self, block: str, schemas: Schemas, make_id: Callable[[], str]) \
            -> list[ToolCall] | None:
        try:
            items = json.loads(block.removeprefix(MARK))
        except ValueError:
            return None
        if not isinstance(items, list) or not items:
            return None
        calls = [_array_call(item, make_id) for item in items]
        return None if None in calls else [c for c in calls if c is not None]


@dataclass(frozen=True)
class ArgsSyntax:
    """`[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}`, one call a block."""

    opens: tuple[str, ...] = (MARK,)
    anywhere: bool = True
    separators: str = " \t\r\n"

    def end(self, block: str) -> int | None:
        head = _HEAD.match(block, len(MARK))
        return None if head is None else json_end(block, head.end())

    def parse(self, block: str, schemas: Schemas, make_id: Callable[[], str]) \
            -> list[ToolCall] | None:
        head = _HEAD.match(block, len(MARK))
        if head is None:
            return None
        try:
            arguments = json.loads(block[head.end():])
        except ValueError:
            return None
        if not isinstance(arguments, dict):
            return None
        return [ToolCall(_id(head[2], make_id), head[1], compact(arguments))]


def _array_call(item: Any, make_id: Callable[[], str]) -> ToolCall | None:
    """A call with the model's own id when it is a valid one."""
    if not isinstance(item, dict):
        return None
    call_id = _id(item.get("id"), make_id)
    return call_from_json(item, lambda: call_id)


def array_grammar(functions: Functions, parallel: bool, param: str = "tools") -> str:
    """GBNF for `[TOOL_CALLS][...]`: one call, or with `parallel` one or more."""
    rules = CallRules(param)
    tail = f'"," space {rules.json_literal("id")} space ":" space {_ID_GBNF}'
    rules.add("tool-call", " | ".join(rules.json_calls(functions, tail=tail)))
    calls = 'tool-call ( "," space tool-call )*' if parallel else "tool-call"
    return rules.build(f'{rules.literal(MARK)} "[" {calls} "]"')


def args_grammar(functions: Functions, parallel: bool, param: str = "tools") -> str:
    """GBNF for `[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}`: one call, or with `parallel` more."""
    require_functions(functions, param)
    rules = CallRules(param)
    call_id = f'( {rules.literal("[CALL_ID]")} [a-zA-Z0-9]{{9}} )?'
    calls = []
    for i, (name, parameters) in enumerate(functions):
        arguments = rules.arguments(i, name, parameters)
        calls.append(rules.add(f"tool{i}-call", f'{rules.literal(MARK + name)} {call_id} '
                               f'{rules.literal("[ARGS]")} {arguments}'))
    rules.add("tool-call", " | ".join(calls))
    return rules.build("tool-call+" if parallel else "tool-call")


FAMILY = Family("mistral", lambda source: MARK in source, ArraySyntax(), array_grammar, TRIGGER,
                make_id=short_call_id, preserved=PRESERVED)
ARGS_FAMILY = Family("mistral_args", lambda source: MARK in source and "[ARGS]" in source,
                     ArgsSyntax(), args_grammar, TRIGGER, make_id=short_call_id,
                     preserved=PRESERVED)
