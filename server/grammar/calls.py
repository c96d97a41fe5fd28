"""GBNF for tool calls: the pieces every family's call syntax is built from.

A family writes the shape of its calls (`<tool_call>` blocks, `[TOOL_CALLS]` arrays, XML
parameters); the arguments come from each function's `parameters` schema, checked as
`response_format` schemas are, with errors naming `tools[i].function.parameters`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from server.errors import InvalidRequest
from server.grammar.json_schema import Converter, visit


class CallRules:
    """One grammar under construction: literals, argument rules and the root."""

    def __init__(self, param: str = "tools") -> None:
        self._converter = Converter()
        self._param = param

    def literal(self, text: str) -> str:
        """`text` as a GBNF string literal."""
        return str(self._converter._format_literal(text))

    def json_literal(self, value: Any) -> str:
        """`value` as JSON text, as a GBNF literal (a name as `"get_weather"`)."""
        return self.literal(json.dumps(value, ensure_ascii=False))

    def schema(self, schema: Any, *, rule: str, index: int, function: str) -> str:
        """The rule for JSON valid against `schema`, a part of function `index`'s parameters."""
        return visit(self._converter, schema, name=rule, prefix=f"tool{index}-",
                     param=f"{self._param}[{index}].function.parameters",
                     context=f"tool parameter schemas (function '{function}')")

    def arguments(self, index: int, name: str, parameters: dict[str, Any]) -> str:
        """The rule for function `index`'s arguments object."""
        return self.schema(parameters, rule=f"tool{index}-arguments", index=index, function=name)

    def json_calls(self, functions: Sequence[tuple[str, dict[str, Any]]],
                   arguments_key: str = "arguments", tail: str = "") -> list[str]:
        """A rule per function for `{"name": ..., "<arguments_key>": {...}}`; `tail`: GBNF for
        more members (`"," space ...`) before the closing brace."""
        require_functions(functions, self._param)
        calls = []
        for i, (name, parameters) in enumerate(functions):
            arguments = self.arguments(i, name, parameters)
            calls.append(self.add(f"tool{i}-call", (
                f'"{{" space {self.json_literal("name")} space ":" space '
                f'{self.json_literal(name)} space "," space '
                f'{self.json_literal(arguments_key)} space ":" space {arguments} {tail} "}}"')))
        return calls

    def text_until(self, rule: str, delimiter: str) -> str:
        """A rule for any text that does not contain `delimiter` (whose first character occurs
        in it only once): the states of a matcher that has read a prefix of the delimiter."""
        first = delimiter[0]
        if first in delimiter[1:]:
            raise ValueError(f"{delimiter!r}: its first character repeats")

        def state(i: int) -> str:
            return f"{rule}-{i}" if i else rule

        self.add(rule, f'"" | {_not(first)} {rule} | {self.literal(first)} {state(1)}')
        for i in range(1, len(delimiter)):
            nxt = delimiter[i]
            alts = ['""', f"{self.literal(first)} {state(1)}",
                    f"{_not(first + nxt)} {rule}"]
            if i + 1 < len(delimiter):
                alts.append(f"{self.literal(nxt)} {state(i + 1)}")
            self.add(state(i), " | ".join(alts))
        return rule

    def add(self, name: str, body: str) -> str:
        """Add (or replace) a rule; its name."""
        self._converter._rules[name] = body
        return name

    def build(self, root: str) -> str:
        """The grammar text, `root` the body of its root rule."""
        self.add("root", root)
        return str(self._converter.grammar())


def _not(chars: str) -> str:
    inner = "".join("\\" + c if c in "\\]^-" else c for c in dict.fromkeys(chars))
    return f"[^{inner}]"


def require_functions(functions: object, param: str = "tools") -> None:
    """InvalidRequest when there is nothing to call."""
    if not functions:
        raise InvalidRequest("No functions to call: give at least one tool.", param=param)
