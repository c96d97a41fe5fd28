"""JSON Schema → llama.cpp GBNF grammars, for `response_format` and for tool-call arguments.

The grammars come from llama-cpp-python's port of llama.cpp's schema converter, which silently
drops what it cannot enforce. So each schema is first checked and rewritten (rewrite.py,
regex.py): a keyword the grammar could not enforce is a 400 naming its JSON pointer, and
the rest is put in the forms the converter handles exactly.
"""

from __future__ import annotations

import json
from typing import Any

from llama_cpp import llama_grammar

from server.errors import InvalidRequest
from server.grammar.rewrite import SchemaRewriter

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
    converter = Converter()
    visit(converter, schema, name="", prefix="", param=param, context="response_format schemas")
    return converter.grammar()


class Converter(_SchemaConverter):  # type: ignore[misc]
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


def visit(converter: Any, schema: Any, *, name: str, prefix: str, param: str,
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
