"""Hermes `<tool_call>` blocks (Hermes 2/3, Qwen2.5, SmolLM2), also the generic fallback.

A call is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`. For a template that
does not render `tools`, `describe` teaches this format in the system message and `as_text`
writes earlier calls and results in it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from server.chat.calls import Schemas, ToolCall, call_from_json
from server.chat.families.base import Family, Functions
from server.engine.textstream import partial_suffix
from server.grammar.calls import CallRules

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# For lazy grammars. llama.cpp (as vendored by llama-cpp-python 0.3.36) searches an unanchored
# pattern in all text generated so far (std::regex_search) and starts the grammar at the match.
# The `[\s\S]*?(<tool_call>[\s\S]*)` form that older builds needed for std::regex_match is
# cubic under search: 9 s of sampling for 400 words of prose before a call.
TRIGGER_PATTERN = OPEN


@dataclass(frozen=True)
class TaggedSyntax:
    """Blocks between an open and a close tag, anywhere in the reply, holding one JSON call."""

    open: str = OPEN
    close: str = CLOSE
    separators: str = " \t\r\n"
    anywhere: bool = True

    @property
    def opens(self) -> tuple[str, ...]:
        return (self.open,)

    def end(self, block: str) -> int | None:
        at = block.find(self.close, len(self.open))
        return None if at < 0 else at + len(self.close)

    def body(self, block: str) -> str:
        """The text between the tags; a cut-off block loses what may be a partial close tag."""
        body = block[len(self.open):]
        if body.endswith(self.close):
            return body[:-len(self.close)]
        return body[:len(body) - partial_suffix(body, self.close)]

    def parse(self, block: str, schemas: Schemas, make_id: Callable[[], str]) \
            -> list[ToolCall] | None:
        try:
            call = call_from_json(json.loads(self.body(block)), make_id)
        except ValueError:
            return None
        return [call] if call else None


def grammar(functions: Functions, parallel: bool, param: str = "tools") -> str:
    """GBNF for one `<tool_call>` block (or, with `parallel`, several joined by newlines).

    Each block holds `{"name": ..., "arguments": ...}` with the arguments valid for the named
    function's parameters schema; function i's schema errors name `{param}[i].function.parameters`.
    """
    rules = CallRules(param)
    calls = rules.json_calls(functions)
    rules.add("tool-call", f'"<tool_call>\\n" ( {" | ".join(calls)} ) "\\n</tool_call>"')
    return rules.build('tool-call ( "\\n" tool-call )*' if parallel else "tool-call")


# Other formats inside <tool_call> (GLM's <arg_key>, MiniMax's <invoke>, XML functions without
# Qwen3-Coder's newlines) are no Hermes: left to the generic family, which describes its own.
_OTHER_BODIES = ("<arg_key>", "<invoke name=", "<function=")


def detect(source: str) -> bool:
    """As llama.cpp: calls inside <tool_call> (Hermes 2/3, Qwen2.5, Qwen3, Granite 4)."""
    return OPEN in source and not any(body in source for body in _OTHER_BODIES)


FAMILY = Family("hermes", detect, TaggedSyntax(), grammar, TRIGGER_PATTERN)
GENERIC = Family("generic", lambda source: True, TaggedSyntax(), grammar, TRIGGER_PATTERN)

_INSTRUCTIONS = {
    "auto": "You may call one or more functions to assist with the user query.",
    "required": "You must call one or more functions: reply with tool calls only.",
    "named": "You must call the function '{name}': reply with that tool call only.",
}


def describe(specs: Sequence[dict[str, Any]], mode: str, named: str, parallel: bool) -> str:
    """The system text that teaches a model without a tools-aware template to call functions."""
    lines = [
        "# Tools", "", _INSTRUCTIONS[mode].format(name=named),
        *([] if parallel else ["Call at most one function per reply."]), "",
        "You are provided with function signatures within <tools></tools> XML tags:", "<tools>",
        *(json.dumps(spec, ensure_ascii=False) for spec in specs), "</tools>", "",
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:",
        OPEN, '{"name": <function-name>, "arguments": <args-json-object>}', CLOSE,
    ]
    return "\n".join(lines)


def as_text(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool turns written out: calls as `<tool_call>` blocks, results as `<tool_response>` in
    a user turn (consecutive results share one)."""
    out: list[dict[str, Any]] = []
    previous = None
    for message in messages:
        role = message.get("role")
        if role == "tool":
            block = f"<tool_response>\n{text_of(message.get('content'))}\n</tool_response>"
            if previous == "tool":
                out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n{block}"}
            else:
                out.append({"role": "user", "content": block})
        elif role == "assistant" and message.get("tool_calls"):
            blocks = "\n".join(_call_block(call) for call in message["tool_calls"])
            content = text_of(message.get("content"))
            rest = {k: v for k, v in message.items() if k != "tool_calls"}
            out.append({**rest, "content": f"{content}\n{blocks}" if content else blocks})
        else:
            out.append(dict(message))
        previous = role
    return out


def _call_block(call: dict[str, Any]) -> str:
    function = call.get("function") or {}
    arguments = parsed_arguments(function.get("arguments"))
    body = json.dumps({"name": function.get("name"), "arguments": arguments}, ensure_ascii=False)
    return f"{OPEN}\n{body}\n{CLOSE}"


def parsed_arguments(arguments: Any) -> Any:
    """Arguments as sent (a JSON string) decoded; text that is no JSON stays text."""
    if arguments is None:
        return {}
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def text_of(content: Any) -> str:
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""
