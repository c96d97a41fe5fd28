"""Llama 3.1/3.2/3.3 JSON calls: the reply is `{"name": ..., "parameters": {...}}`, maybe
after `<|python_tag|>`. Only a reply that starts with a call is one: JSON later in prose is text.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from server.chat.calls import Schemas, ToolCall, call_from_json, json_end
from server.chat.families.base import Family, Functions
from server.grammar.calls import CallRules

PYTHON_TAG = "<|python_tag|>"
# Anchored: the grammar applies only when the reply opens with a call (llama.cpp's pattern).
TRIGGER = r'^\s*(?:<\|python_tag\|>)?\s*(\{\s*"name")'


def detect(source: str) -> bool:
    """As llama.cpp: tool results go in an `ipython` turn (Functionary 3.1 too, but not its
    `<function=` calls)."""
    return "<|start_header_id|>ipython<|end_header_id|>" in source and "<function=" not in source


@dataclass(frozen=True)
class JsonSyntax:
    opens: tuple[str, ...] = (PYTHON_TAG, "{")
    anywhere: bool = False
    separators: str = " \t\r\n;"

    def end(self, block: str) -> int | None:
        start = block.find("{")
        return None if start < 0 else json_end(block, start)

    def parse(self, block: str, schemas: Schemas, make_id: Callable[[], str]) \
            -> list[ToolCall] | None:
        body = block.removeprefix(PYTHON_TAG)
        try:
            call = call_from_json(json.loads(body), make_id, arguments_key="parameters")
        except ValueError:
            return None
        return [call] if call else None


def grammar(functions: Functions, parallel: bool, param: str = "tools") -> str:
    """GBNF for one `{"name": ..., "parameters": ...}` call (with `parallel`, several, one a
    line)."""
    rules = CallRules(param)
    calls = rules.json_calls(functions, arguments_key="parameters")
    rules.add("tool-call", " | ".join(calls))
    return rules.build('tool-call ( "\\n" tool-call )*' if parallel else "tool-call")


FAMILY = Family("llama3", detect, JsonSyntax(), grammar, TRIGGER, preserved=(PYTHON_TAG,))
