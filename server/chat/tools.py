"""OpenAI `tools`/`tool_choice` → a ToolPlan: the functions offered, checked, in the call format
of the model's family (see families/), with the grammar of the calls allowed.

Tools reach the prompt through the template's own `tools` variable when the template renders
them in a known family's format; otherwise the functions and the Hermes-style format are
described in the system message, and earlier calls and results are written out as text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from server.chat.families import GENERIC, Family, prompt_family
from server.chat.families.hermes import as_text, describe, parsed_arguments, text_of
from server.errors import InvalidRequest
from server.grammar.rewrite import enforceable

__all__ = ["Function", "ToolPlan", "plan_tools", "prepare_messages"]
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names
# A function without parameters is called with `{}` exactly.
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}

Mode = Literal["auto", "required", "named"]


@dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: dict[str, Any]
    strict: bool = False  # the arguments must meet every assertion of `parameters`

    def enforced(self) -> dict[str, Any]:
        """The schema the grammar enforces: all of it for a strict function; else without
        the assertions no grammar can enforce (formats like "uri", "minimum"), which a client
        sending them (Claude Code's WebFetch, MCP servers' tools) does not expect enforced of a
        non-strict tool, as OpenAI and Anthropic do not."""
        return self.parameters if self.strict else enforceable(self.parameters)

    def spec(self) -> dict[str, Any]:
        """The OpenAI tool object, as chat templates that render `tools` expect it."""
        function = {"name": self.name, "description": self.description,
                    "parameters": self.parameters}
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolPlan:
    functions: tuple[Function, ...]  # the tools offered to the model
    mode: Mode
    parallel: bool
    gbnf: str  # the calls allowed: any offered function, or only the named one
    lazy: bool  # "auto": the grammar applies once the model starts a call
    trigger_pattern: str  # for lazy grammars (the family's trigger), else ""
    named: str = ""  # mode "named": the function tool_choice names
    family: Family = GENERIC

    def schemas(self) -> dict[str, dict[str, Any]]:
        """Each function's parameters schema, by name (parsers type values by it)."""
        return {f.name: f.parameters for f in self.functions}


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice: Any,
               parallel_tool_calls: bool | None, template: str | None = None) -> ToolPlan | None:
    """What the model whose chat template is `template` may call, in its family's format; None
    when it may call nothing. InvalidRequest names the field."""
    choice = _tool_choice(tool_choice)
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise InvalidRequest("parallel_tool_calls must be true or false.",
                             param="parallel_tool_calls")
    if tools is not None and not isinstance(tools, list):
        raise InvalidRequest("tools must be an array of tools.", param="tools")
    if not tools:
        if choice in ("none", "auto"):
            return None
        raise InvalidRequest(f"tool_choice {json.dumps(tool_choice)} needs tools: give 'tools', "
                             "or leave tool_choice out.", param="tool_choice")
    functions = tuple(_function(tool, i) for i, tool in enumerate(tools))
    _check_unique(functions)
    parallel = parallel_tool_calls is not False
    pairs = [(f.name, f.enforced()) for f in functions]
    family = prompt_family(template)
    gbnf = family.grammar(pairs, parallel)  # checks every schema, with its param
    if choice == "none":
        return None
    mode: Mode = "auto" if choice == "auto" else "required" if choice == "required" else "named"
    if mode == "named":
        if choice not in {f.name for f in functions}:
            raise InvalidRequest(f"tool_choice names the function '{choice}', which is not in "
                                 f"tools ({', '.join(f.name for f in functions)}).",
                                 param="tool_choice")
        gbnf = family.grammar([p for p in pairs if p[0] == choice], parallel)
    return ToolPlan(functions, mode, parallel, gbnf, lazy=mode == "auto",
                    trigger_pattern=family.trigger if mode == "auto" else "",
                    named=choice if mode == "named" else "", family=family)


def _tool_choice(value: Any) -> str:
    """"none", "auto", "required", or the name of the one function to call."""
    if value is None:
        return "auto"
    if value in ("none", "auto", "required"):
        return str(value)
    if isinstance(value, dict) and value.get("type") == "function":
        function = value.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return str(function["name"])
    raise InvalidRequest('tool_choice must be "none", "auto", "required" or '
                         '{"type": "function", "function": {"name": "..."}}.',
                         param="tool_choice")


def _function(tool: Any, i: int) -> Function:
    where = f"tools[{i}]"
    if not isinstance(tool, dict):
        raise InvalidRequest(f'{where} must be an object: {{"type": "function", '
                             '"function": {"name": ...}}.', param=where)
    if tool.get("type") != "function":
        raise InvalidRequest(f"{where}.type is {json.dumps(tool.get('type'))}: only \"function\" "
                             "tools are supported.", param=f"{where}.type")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise InvalidRequest(f"{where}.function must be an object with a name.",
                             param=f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise InvalidRequest(f"{where}.function.name must be 1 to 64 letters, digits, "
                             f"underscores or dashes; got {json.dumps(name)}.",
                             param=f"{where}.function.name")
    description = function.get("description") or ""
    if not isinstance(description, str):
        raise InvalidRequest(f"{where}.function.description must be a string.",
                             param=f"{where}.function.description")
    parameters = function.get("parameters")
    strict = function.get("strict") is True
    if parameters is None:
        return Function(name, description, NO_PARAMETERS, strict)
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise InvalidRequest(f'{where}.function.parameters must be a JSON Schema with "type": '
                             '"object".', param=f"{where}.function.parameters")
    return Function(name, description, {"type": "object", **parameters}, strict)


def _check_unique(functions: tuple[Function, ...]) -> None:
    seen: set[str] = set()
    for i, function in enumerate(functions):
        if function.name in seen:
            raise InvalidRequest(f"tools[{i}].function.name '{function.name}' is used by an "
                                 "earlier tool: function names must be unique.",
                                 param=f"tools[{i}].function.name")
        seen.add(function.name)


def describe_tools(plan: ToolPlan) -> str:
    """The system text that teaches a model without a tools-aware template to call functions."""
    return describe([f.spec() for f in plan.functions], plan.mode, plan.named, plan.parallel)


def prepare_messages(messages: list[dict[str, Any]], plan: ToolPlan | None,
                     native: bool) -> list[dict[str, Any]]:
    """Messages ready for the chat template: with tools described and tool turns as text when
    the template renders no tools of a known family (`native` False), or with arguments as
    mappings."""
    if native:
        return [_with_parsed_arguments(message) for message in messages]
    converted = as_text(messages)
    if plan is None:
        return converted
    tools_text = describe_tools(plan)
    if converted and converted[0].get("role") == "system":
        system = text_of(converted[0].get("content"))
        first = {**converted[0], "content": f"{system}\n\n{tools_text}" if system else tools_text}
        return [first, *converted[1:]]
    return [{"role": "system", "content": tools_text}, *converted]


def _with_parsed_arguments(message: dict[str, Any]) -> dict[str, Any]:
    calls = message.get("tool_calls")
    if not calls:
        return dict(message)
    parsed = []
    for call in calls:
        function = call.get("function") or {}
        arguments = parsed_arguments(function.get("arguments"))
        if isinstance(arguments, dict):  # HF templates iterate arguments as a mapping
            call = {**call, "function": {**function, "arguments": arguments}}
        parsed.append(call)
    return {**message, "tool_calls": parsed}
