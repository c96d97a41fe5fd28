"""OpenAI tools for models that call functions in the Hermes `<tool_call>` format.

A call is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, as Qwen2.5, Hermes and
SmolLM2 were trained to write. This module validates `tools`/`tool_choice`, builds the grammar of
the calls allowed, describes the functions in the prompt when the chat template cannot, and
splits generated text back into content and tool calls.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from server.errors import InvalidRequest
from server.structured import tool_call_grammar
from server.toolcalls import CLOSE, OPEN, Content, ToolCall, ToolCallParser, new_call_id

__all__ = [
    "TRIGGER_PATTERN", "Content", "Function", "ToolCall", "ToolCallParser", "ToolPlan",
    "describe_tools", "new_call_id", "plan_tools", "prepare_messages", "template_handles_tools",
]
# For lazy grammars. llama.cpp (as vendored by llama-cpp-python 0.3.36) searches an unanchored
# pattern in all text generated so far (std::regex_search) and starts the grammar at the match.
# The `[\s\S]*?(<tool_call>[\s\S]*)` form that older builds needed for std::regex_match is
# cubic under search: 9 s of sampling for 400 words of prose before a call.
TRIGGER_PATTERN = "<tool_call>"
NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function names
# A function without parameters is called with `{}` exactly.
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}

Mode = Literal["auto", "required", "named"]


@dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: dict[str, Any]

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
    lazy: bool  # "auto": the grammar applies once the model starts "<tool_call>"
    trigger_pattern: str  # for lazy grammars (TRIGGER_PATTERN), else ""
    named: str = ""  # mode "named": the function tool_choice names


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice: Any,
               parallel_tool_calls: bool | None) -> ToolPlan | None:
    """What the model may call; None when it may call nothing. InvalidRequest names the field."""
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
    pairs = [(f.name, f.parameters) for f in functions]
    gbnf = tool_call_grammar(pairs, parallel=parallel)  # checks every schema, with its param
    if choice == "none":
        return None
    mode: Mode = "auto" if choice == "auto" else "required" if choice == "required" else "named"
    if mode == "named":
        if choice not in {f.name for f in functions}:
            raise InvalidRequest(f"tool_choice names the function '{choice}', which is not in "
                                 f"tools ({', '.join(f.name for f in functions)}).",
                                 param="tool_choice")
        gbnf = tool_call_grammar([p for p in pairs if p[0] == choice], parallel=parallel)
    return ToolPlan(functions, mode, parallel, gbnf, lazy=mode == "auto",
                    trigger_pattern=TRIGGER_PATTERN if mode == "auto" else "",
                    named=choice if mode == "named" else "")


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
    if parameters is None:
        return Function(name, description, NO_PARAMETERS)
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise InvalidRequest(f'{where}.function.parameters must be a JSON Schema with "type": '
                             '"object".', param=f"{where}.function.parameters")
    return Function(name, description, {"type": "object", **parameters})


def _check_unique(functions: tuple[Function, ...]) -> None:
    seen: set[str] = set()
    for i, function in enumerate(functions):
        if function.name in seen:
            raise InvalidRequest(f"tools[{i}].function.name '{function.name}' is used by an "
                                 "earlier tool: function names must be unique.",
                                 param=f"tools[{i}].function.name")
        seen.add(function.name)


_JINJA_CODE = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.DOTALL)
_STRING_LITERAL = re.compile(r"'[^']*'|\"[^\"]*\"")
_TOOLS_VARIABLE = re.compile(r"(?<![\w.])tools\b")


def template_handles_tools(template_source: str) -> bool:
    """Whether a Jinja chat template reads the `tools` variable (so renders tools itself)."""
    return any(_TOOLS_VARIABLE.search(_STRING_LITERAL.sub("", code))
               for code in _JINJA_CODE.findall(template_source))


_INSTRUCTIONS = {
    "auto": "You may call one or more functions to assist with the user query.",
    "required": "You must call one or more functions: reply with tool calls only.",
    "named": "You must call the function '{name}': reply with that tool call only.",
}


def describe_tools(plan: ToolPlan) -> str:
    """The system text that teaches a model without a tools-aware template to call functions."""
    lines = [
        "# Tools", "", _INSTRUCTIONS[plan.mode].format(name=plan.named),
        *([] if plan.parallel else ["Call at most one function per reply."]), "",
        "You are provided with function signatures within <tools></tools> XML tags:", "<tools>",
        *(json.dumps(f.spec(), ensure_ascii=False) for f in plan.functions), "</tools>", "",
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:",
        OPEN, '{"name": <function-name>, "arguments": <args-json-object>}', CLOSE,
    ]
    return "\n".join(lines)


def prepare_messages(messages: list[dict[str, Any]], plan: ToolPlan | None,
                     native: bool) -> list[dict[str, Any]]:
    """Messages ready for the chat template: with tools described and tool turns as text when
    the template knows nothing of tools (`native` False), or with arguments as mappings."""
    if native:
        return [_with_parsed_arguments(message) for message in messages]
    converted = _tool_turns_as_text(messages)
    if plan is None:
        return converted
    tools_text = describe_tools(plan)
    if converted and converted[0].get("role") == "system":
        system = _text(converted[0].get("content"))
        first = {**converted[0], "content": f"{system}\n\n{tools_text}" if system else tools_text}
        return [first, *converted[1:]]
    return [{"role": "system", "content": tools_text}, *converted]


def _tool_turns_as_text(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    previous = None
    for message in messages:
        role = message.get("role")
        if role == "tool":
            block = f"<tool_response>\n{_text(message.get('content'))}\n</tool_response>"
            if previous == "tool":  # one user turn holds consecutive results
                out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n{block}"}
            else:
                out.append({"role": "user", "content": block})
        elif role == "assistant" and message.get("tool_calls"):
            blocks = "\n".join(_call_block(call) for call in message["tool_calls"])
            content = _text(message.get("content"))
            rest = {k: v for k, v in message.items() if k != "tool_calls"}
            out.append({**rest, "content": f"{content}\n{blocks}" if content else blocks})
        else:
            out.append(dict(message))
        previous = role
    return out


def _call_block(call: dict[str, Any]) -> str:
    function = call.get("function") or {}
    arguments = _parsed(function.get("arguments"))
    body = json.dumps({"name": function.get("name"), "arguments": arguments}, ensure_ascii=False)
    return f"{OPEN}\n{body}\n{CLOSE}"


def _with_parsed_arguments(message: dict[str, Any]) -> dict[str, Any]:
    calls = message.get("tool_calls")
    if not calls:
        return dict(message)
    parsed = []
    for call in calls:
        function = call.get("function") or {}
        arguments = _parsed(function.get("arguments"))
        if isinstance(arguments, dict):  # HF templates iterate arguments as a mapping
            call = {**call, "function": {**function, "arguments": arguments}}
        parsed.append(call)
    return {**message, "tool_calls": parsed}


def _parsed(arguments: Any) -> Any:
    if arguments is None:
        return {}
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def _text(content: Any) -> str:
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""
