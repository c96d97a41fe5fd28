"""JSON Schema → llama.cpp GBNF grammars, for `response_format` and for tool calls.

The grammars come from llama-cpp-python's port of llama.cpp's schema converter, which silently
drops what it cannot enforce. So each schema is first checked and rewritten (schema_rewrite.py,
schema_regex.py): a keyword the grammar could not enforce is a 400 naming its JSON pointer, and
the rest is put in the forms the converter handles exactly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from llama_cpp import llama_grammar

from server.errors import InvalidRequest
from server.schema_rewrite import SchemaRewriter

_SchemaConverter: Any = llama_grammar.SchemaConverter

# After llama.cpp's grammars/json.gbnf, with its exponent rule fixed ("1e10" was refused).
JSON_OBJECT_GBNF = r"""root ::= object
value ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ( "," ws string ":" ws value )* )? "}" ws
array ::= "[" ws ( value ( "," ws value )* )? "]" ws
string ::= "\"" ( [^"\\\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} ) )* "\"" ws
number ::= "-"? ( [0-9] | [1-9] [0-9]{0,15} ) ( "." [0-9]+ )? ( [eE] [-+]? [0-9]{1,16} )? ws
ws ::= | " " | "\n" [ \t]{0,20}
"""

# The converter's `char` lets raw control characters into strings, which JSON forbids.
JSON_CHAR_RULE = r'[^"\\\x00-\x1F] | [\\] ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} )'

CONVERTER_ERRORS = (ValueError, AssertionError, KeyError, IndexError, TypeError, AttributeError)


def json_object_grammar() -> str:
    """GBNF for any JSON object (the root must be an object), as `response_format: json_object`."""
    return JSON_OBJECT_GBNF


def json_schema_grammar(schema: Any, param: str = "response_format.json_schema.schema") -> str:
    """GBNF for JSON valid against `schema`; InvalidRequest(param=param) names what cannot be."""
    converter = _Converter()
    _visit(converter, schema, name="", prefix="", param=param, context="response_format schemas")
    return converter.grammar()


def tool_call_grammar(functions: Sequence[tuple[str, dict[str, Any]]], *, parallel: bool,
                      param: str = "tools") -> str:
    """GBNF for one `<tool_call>` block (or, with `parallel`, several joined by newlines).

    Each block holds `{"name": ..., "arguments": ...}` with the arguments valid for the named
    function's parameters schema; function i's schema errors name `{param}[i].function.parameters`.
    """
    if not functions:
        raise InvalidRequest("No functions to call: give at least one tool.", param=param)
    converter = _Converter()
    calls = []
    for i, (name, parameters) in enumerate(functions):
        arguments = _visit(converter, parameters, name=f"tool{i}-arguments", prefix=f"tool{i}-",
                           param=f"{param}[{i}].function.parameters",
                           context=f"tool parameter schemas (function '{name}')")
        quote = converter._format_literal
        converter._rules[f"tool{i}-call"] = (
            f'"{{" space {quote(json.dumps("name"))} space ":" space '
            f'{quote(json.dumps(name, ensure_ascii=False))} space "," space '
            f'{quote(json.dumps("arguments"))} space ":" space {arguments} "}}"')
        calls.append(f"tool{i}-call")
    converter._rules["tool-call"] = f'"<tool_call>\\n" ( {" | ".join(calls)} ) "\\n</tool_call>"'
    converter._rules["root"] = 'tool-call ( "\\n" tool-call )*' if parallel else "tool-call"
    return converter.grammar()


class _Converter(_SchemaConverter):  # type: ignore[misc]
    """llama.cpp's converter with JSON-correct literals: upstream leaves backslashes unescaped,
    so an enum value or property name holding `\\` or `"` made a wrong or unparsable grammar."""

    def __init__(self) -> None:
        super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)

    def _format_literal(self, literal: str) -> str:
        return '"' + "".join(_gbnf_char(c) for c in literal) + '"'

    def _generate_constant_rule(self, value: Any) -> str:
        return self._format_literal(json.dumps(value, ensure_ascii=False))

    def grammar(self) -> str:
        if "char" in self._rules:
            self._rules["char"] = JSON_CHAR_RULE
        return str(self.format_grammar()) + "\n"


def _gbnf_char(c: str) -> str:
    if c in '\\"':
        return "\\" + c
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c) or (
        f"\\x{ord(c):02X}" if ord(c) < 0x20 else c)


def _visit(converter: Any, schema: Any, *, name: str, prefix: str, param: str,
           context: str) -> str:
    """Add the rules for `schema` to the converter; the name of its rule."""
    rewriter = SchemaRewriter(schema, param=param, context=context, prefix=prefix)
    try:
        top = rewriter.rewrite()
        url = prefix or "schema"
        converter.resolve_refs({"$defs": rewriter.defs, "top": top}, url)
        # Definitions claim their rule names first: the converter finds a reference's rule by
        # name, so a property rule of the same name would otherwise stand in for it.
        for def_name in rewriter.defs:
            converter._resolve_ref(f"{url}#/$defs/{def_name}")
        return str(converter.visit(top, name))
    except RecursionError:
        raise InvalidRequest("The schema is nested too deeply to turn into a grammar; "
                             "simplify it.", param=param) from None
    except CONVERTER_ERRORS as exc:  # raised by the converter, on what the checks let through
        raise InvalidRequest(f"The schema could not be turned into a grammar "
                             f"({str(exc)[:200]}); simplify it.", param=param) from None
