"""Qwen3-Coder's XML calls (also Qwen3.5, Nemotron Nano 3, StepFun-3.5):

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

A string parameter is raw text; any other value is JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from server.chat.calls import Schemas, ToolCall, compact
from server.chat.families.base import Family, Functions
from server.chat.families.hermes import TaggedSyntax
from server.grammar.calls import CallRules, require_functions

_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)(?:\n?</parameter>|$)", re.DOTALL)
_VALUE_END = "\n</parameter>"
# Keywords that leave a string unconstrained, so it can go raw (else it goes as JSON, checked).
_FREE_STRING_KEYS = {"type", "description", "title", "default", "examples"}


def detect(source: str) -> bool:
    """As llama.cpp: XML parameters inside <tool_call>, with newlines between the tags."""
    return all(s in source for s in ("<tool_call>", "<function=", "<parameter=")) and \
        "'<tool_call><function=' ~ tool_call.name ~ '>'" not in source


def _raw(schema: Any) -> bool:
    """Whether a parameter is written as raw text: an unconstrained string or string enum."""
    if not isinstance(schema, dict):
        return False
    if "enum" in schema and all(isinstance(v, str) for v in schema["enum"]):
        return True
    return schema.get("type") == "string" and set(schema) <= _FREE_STRING_KEYS


class XmlSyntax(TaggedSyntax):
    def parse(self, block: str, schemas: Schemas, make_id: Callable[[], str]) \
            -> list[ToolCall] | None:
        found = _FUNCTION.search(self.body(block))
        if found is None or not found[1].strip():
            return None
        name = found[1].strip()
        properties = (schemas.get(name) or {}).get("properties") or {}
        arguments: dict[str, Any] = {}
        for key, value in _PARAMETER.findall(found[2]):
            key = key.strip()
            arguments[key] = value if _raw(properties.get(key)) else _decoded(value)
        return [ToolCall(make_id(), name, compact(arguments))]


def _decoded(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def grammar(functions: Functions, parallel: bool, param: str = "tools") -> str:
    """GBNF for one `<tool_call>` block (or, with `parallel`, several joined by newlines): each
    function's parameters in the order its schema lists them, the required ones present."""
    require_functions(functions, param)
    rules = CallRules(param)
    text = rules.text_until("raw-text", _VALUE_END)
    calls = []
    for i, (name, parameters) in enumerate(functions):
        properties = parameters.get("properties") or {}
        required = set(parameters.get("required") or [])
        parts = []
        for j, (key, schema) in enumerate(properties.items()):
            value = _value_rule(rules, schema, text, i, j, name)
            open_tag = rules.literal(f"<parameter={key}>\n")
            close_tag = rules.literal(_VALUE_END + "\n")
            part = rules.add(f"tool{i}-param{j}", f"{open_tag} {value} {close_tag}")
            parts.append(part if key in required else f"{part}?")
        head = rules.literal(f"<tool_call>\n<function={name}>\n")
        tail = rules.literal("</function>\n</tool_call>")
        calls.append(rules.add(f"tool{i}-call", f'{head} {" ".join(parts)} {tail}'))
    rules.add("tool-call", " | ".join(calls))
    return rules.build('tool-call ( "\\n" tool-call )*' if parallel else "tool-call")


def _value_rule(rules: CallRules, schema: Any, text: str, i: int, j: int, name: str) -> str:
    if not _raw(schema):
        return rules.schema(schema, rule=f"tool{i}-param{j}-value", index=i, function=name)
    if "enum" in schema:
        return rules.add(f"tool{i}-param{j}-value",
                         " | ".join(rules.literal(v) for v in schema["enum"]))
    return text


FAMILY = Family("qwen3_coder", detect, XmlSyntax(), grammar, "<tool_call>")
