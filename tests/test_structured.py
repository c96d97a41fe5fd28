"""JSON Schema → GBNF: the grammars are checked by llama.cpp's own grammar sampler."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest

from server.chat.families.hermes import grammar as tool_call_grammar
from server.errors import InvalidRequest
from server.grammar.json_schema import json_object_grammar, json_schema_grammar
from tests.grammar_match import Vocab, default_vocab, grammar_accepts, grammar_parses


@pytest.fixture(scope="module")
def vocab() -> Iterator[Vocab]:
    with default_vocab() as loaded:
        yield loaded


def check(vocab: Vocab, schema: Any, valid: list[Any], invalid: list[Any]) -> None:
    """Every valid instance is generable and every invalid one is not (jsonschema agrees)."""
    gbnf = json_schema_grammar(schema)
    validator = jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    for instance in valid:
        validator.validate(instance)
        assert grammar_accepts(vocab, gbnf, json.dumps(instance, ensure_ascii=False)), instance
    for instance in invalid:
        text = instance if isinstance(instance, str) else json.dumps(instance)
        if not isinstance(instance, str):
            assert not validator.is_valid(instance), instance
        assert not grammar_accepts(vocab, gbnf, text), text


def test_json_object_grammar_takes_objects_only(vocab: Vocab) -> None:
    gbnf = json_object_grammar()
    for text in ["{}", '{"a": [1, -2.5, 3e10, "x\\n\\u00e9"], "b": {"c": null, "d": true}}',
                 '{\n  "a" : 1\n}']:
        assert grammar_accepts(vocab, gbnf, text), text
    for text in ["[1]", '"text"', "42", '{"a": 1', '{"a": 1}}', '{"a": "raw\nnewline"}']:
        assert not grammar_accepts(vocab, gbnf, text), text


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer"},
        "role": {"enum": ["admin", "user"]},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": ["string", "null"]}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_object_schema(vocab: Vocab) -> None:
    address = {"city": "Oslo", "zip": None}
    check(vocab, PERSON, valid=[
        {"name": "Ada", "age": 36},
        {"name": "Ada", "age": 36, "role": "admin", "tags": ["x", "y", "z"], "address": address},
        {"name": "Ada", "age": 36, "address": {"city": "Oslo", "zip": "0150"}},
    ], invalid=[
        {"name": "Ada", "age": "36"},  # wrong type
        {"name": "Ada"},  # missing required
        {"name": "Ada", "age": 36, "email": "a@b.c"},  # extra property
        {"name": "Ada", "age": 36, "role": "root"},  # not in the enum
        {"name": "Ada", "age": 36, "tags": []},  # minItems
        {"name": "Ada", "age": 36, "tags": ["a", "b", "c", "d"]},  # maxItems
        {"name": "", "age": 36},  # minLength
        {"name": "Ada Lovelace-Byron", "age": 36},  # maxLength
        {"name": "Ada", "age": 36, "address": {"city": "Oslo"}},  # nested required
    ])


def test_anyof_refs_and_nullable(vocab: Vocab) -> None:
    schema = {
        "type": "object",
        "properties": {
            "pet": {"anyOf": [{"$ref": "#/$defs/Cat"}, {"$ref": "#/$defs/Dog"}]},
            "owner": {"$ref": "#/$defs/Name", "description": "annotations beside $ref are fine"},
            "nick": {"type": ["string", "null"]},
        },
        "required": ["pet", "owner", "nick"],
        "$defs": {
            "Cat": {"type": "object", "properties": {"meow": {"type": "boolean"}},
                    "required": ["meow"]},
            "Dog": {"type": "object", "properties": {"bark": {"type": "number"}},
                    "required": ["bark"]},
            "Name": {"type": "string", "format": "date"},
        },
    }
    check(vocab, schema, valid=[
        {"pet": {"meow": True}, "owner": "2024-02-29", "nick": None},
        {"pet": {"bark": 1.5}, "owner": "2024-02-29", "nick": "Rex"},
    ], invalid=[
        {"pet": {"moo": 1}, "owner": "2024-02-29", "nick": None},
        {"pet": {"meow": True}, "owner": "yesterday", "nick": None},
        {"pet": {"meow": True}, "owner": "2024-02-29", "nick": 3},
    ])


def test_openapi_nullable(vocab: Vocab) -> None:
    gbnf = json_schema_grammar({"type": "integer", "nullable": True})
    assert grammar_accepts(vocab, gbnf, "null")
    assert grammar_accepts(vocab, gbnf, "7")
    assert not grammar_accepts(vocab, gbnf, '"7"')


def test_type_list_keeps_the_object_constraints(vocab: Vocab) -> None:
    schema = {"type": ["object", "null"], "properties": {"a": {"type": "integer"}},
              "required": ["a"], "additionalProperties": False}
    check(vocab, schema, valid=[None, {"a": 1}], invalid=[{"b": 1}, {"a": "x"}, [], "x"])


def test_reference_names_cannot_collide_with_property_rules(vocab: Vocab) -> None:
    schema = {"type": "object", "properties": {"Kind": {"type": "string"},
                                               "other": {"$ref": "#/$defs/Kind"}},
              "required": ["Kind", "other"], "$defs": {"Kind": {"enum": [1, 2]}}}
    check(vocab, schema, valid=[{"Kind": "x", "other": 2}],
          invalid=[{"Kind": "x", "other": "x"}, {"Kind": 1, "other": 1}])


def test_recursive_reference(vocab: Vocab) -> None:
    schema = {"$ref": "#/$defs/Node", "$defs": {"Node": {
        "type": "object", "properties": {"value": {"type": "integer"},
                                         "children": {"type": "array",
                                                      "items": {"$ref": "#/$defs/Node"}}},
        "required": ["value"], "additionalProperties": False}}}
    tree = {"value": 1, "children": [{"value": 2}, {"value": 3, "children": []}]}
    check(vocab, schema, valid=[tree], invalid=[{"value": 1, "children": [{"v": 2}]}])
    chain = {"type": "object", "properties": {"next": {"$ref": "#"}}, "additionalProperties": False}
    check(vocab, chain, valid=[{}, {"next": {"next": {}}}], invalid=[{"next": 1}])


def test_tuples(vocab: Vocab) -> None:
    schema = {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}],
              "items": False}
    check(vocab, schema, valid=[[1, "a"]], invalid=[["a", 1], [1, "a", 2]])


def test_allof_merges_object_schemas(vocab: Vocab) -> None:
    schema = {"allOf": [{"$ref": "#/$defs/Base"},
                        {"properties": {"b": {"type": "string"}}, "required": ["b"]}],
              "$defs": {"Base": {"type": "object", "properties": {"a": {"type": "integer"}},
                                 "required": ["a"]}}}
    check(vocab, schema, valid=[{"a": 1, "b": "x"}], invalid=[{"a": 1}, {"b": "x"}])
    wrapped = {"type": "object", "properties": {"n": {"allOf": [{"$ref": "#/$defs/N"}],
                                                      "description": "pydantic 2.0 style"}},
               "required": ["n"], "$defs": {"N": {"enum": ["a", "b"]}}}
    check(vocab, wrapped, valid=[{"n": "a"}], invalid=[{"n": "c"}])


def test_values_that_need_escaping(vocab: Vocab) -> None:
    odd = ['say "hi"', "back\\slash", "line\nbreak", "é"]
    schema = {"type": "object", "properties": {'we"ird': {"enum": odd}, "c": {"const": "x\ty"}},
              "required": ['we"ird', "c"]}
    valid = [{'we"ird': value, "c": "x\ty"} for value in odd]
    check(vocab, schema, valid=valid, invalid=[{'we"ird': "say hi", "c": "x\ty"}])


def test_any_value(vocab: Vocab) -> None:
    for schema in ({}, True, {"description": "anything"}):
        check(vocab, schema, valid=[1, "x", [1, {"a": None}], {"a": [True]}, None], invalid=[])
    check(vocab, {"type": "object", "additionalProperties": {"type": "integer"}},
          valid=[{}, {"x": 1, "y": 2}], invalid=[{"x": "1"}])


def test_patterns_are_translated_for_json_strings(vocab: Vocab) -> None:
    check(vocab, {"type": "string", "pattern": r"^\d{3}-\d{4}$"},
          valid=["123-4567"], invalid=["12-34567", "123-456a"])
    check(vocab, {"type": "string", "pattern": r"^v\d+\.\d+(?:-[a-z]+)?$"},
          valid=["v1.20", "v2.0-beta"], invalid=["v1x20", "v1.2-"])
    check(vocab, {"type": "string", "pattern": r'^say "[^"]*"\\?$'},
          valid=['say "hi"', 'say ""\\'], invalid=['say hi'])
    # `.` and negated classes leave out what JSON must escape: a subset of the matches
    gbnf = json_schema_grammar({"type": "string", "pattern": "^a.b$"})
    assert grammar_accepts(vocab, gbnf, '"a-b"')
    assert not grammar_accepts(vocab, gbnf, '"a"b"')


def test_string_formats(vocab: Vocab) -> None:
    check(vocab, {"type": "string", "format": "uuid"},
          valid=["123e4567-e89b-12d3-a456-426614174000"], invalid=['"123e4567"'])
    check(vocab, {"type": "string", "format": "date-time"},
          valid=["2024-01-02T03:04:05Z"], invalid=['"2024-01-02"'])


@pytest.mark.parametrize(("schema", "pointer"), [
    ({"type": "object", "properties": {"age": {"type": "integer", "minimum": 0}}},
     "/properties/age/minimum"),
    ({"type": "number", "maximum": 1}, "/maximum"),
    ({"type": "number", "exclusiveMinimum": 1}, "/exclusiveMinimum"),
    ({"type": "number", "exclusiveMaximum": 1}, "/exclusiveMaximum"),
    ({"type": "integer", "multipleOf": 2}, "/multipleOf"),
    ({"not": {"type": "string"}}, "/not"),
    ({"if": {"type": "string"}, "then": {"minLength": 1}}, "/if"),
    ({"type": "object", "patternProperties": {"^x": {}}}, "/patternProperties"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "/dependentRequired"),
    ({"type": "object", "dependentSchemas": {"a": {}}}, "/dependentSchemas"),
    ({"type": "array", "items": {"type": "array", "uniqueItems": True}}, "/items/uniqueItems"),
    ({"type": "array", "contains": {"type": "string"}}, "/contains"),
    ({"type": "object", "propertyNames": {"maxLength": 3}}, "/propertyNames"),
    ({"type": "object", "minProperties": 1}, "/minProperties"),
    ({"type": "object", "maxProperties": 1}, "/maxProperties"),
    ({"anyOf": [{"type": "object", "unevaluatedProperties": False}]},
     "/anyOf/0/unevaluatedProperties"),
    ({"type": "array", "unevaluatedItems": False}, "/unevaluatedItems"),
    ({"$ref": "https://example.com/schema.json"}, "/$ref"),
    ({"properties": {"a": {"$ref": "other.json#/a"}}}, "/properties/a/$ref"),
    ({"properties": {"a": {"$ref": "#/$defs/Missing"}}}, "/properties/a/$ref"),
    ({"$ref": "#/$defs/A", "type": "object", "$defs": {"A": {}}}, "/type"),
    ({"type": "object", "properties": {"a~b/c": {"type": "decimal"}}}, "/properties/a~0b~1c/type"),
    ({"type": "string", "format": "email"}, "/format"),
    ({"type": "string", "format": "date", "maxLength": 3}, "/maxLength"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "/required"),
    ({"type": "string", "pattern": "[0-9]+"}, "/pattern"),
    ({"type": "string", "pattern": "^(?=a)a$"}, "/pattern"),
    ({"type": "string", "pattern": r"^\bword$"}, "/pattern"),
    ({"type": "string", "pattern": "^*a$"}, "/pattern"),
    ({"type": "array", "items": {"type": "string"}, "maxItems": 100000}, "/maxItems"),
    ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "/allOf/0/type"),
])
def test_unsupported_keywords_name_their_pointer(schema: Any, pointer: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        json_schema_grammar(schema, param="response_format.json_schema.schema")
    assert f"'{pointer}'" in caught.value.message
    assert caught.value.param == "response_format.json_schema.schema"


def test_unsupported_message_says_what_to_do() -> None:
    with pytest.raises(InvalidRequest) as caught:
        json_schema_grammar({"properties": {"age": {"type": "integer", "minimum": 0}}})
    assert caught.value.message == (
        "'/properties/age/minimum' uses 'minimum', which is not supported in response_format "
        "schemas: the grammar cannot enforce it. Remove it, or validate it after generation.")


@pytest.mark.parametrize("schema", [[{"type": "string"}], "string", False, None])
def test_schema_must_be_an_object(schema: Any) -> None:
    with pytest.raises(InvalidRequest, match="The schema root must be a JSON Schema object"):
        json_schema_grammar(schema)


def test_too_deep_a_schema_is_a_400() -> None:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(5000):
        schema = {"type": "array", "items": schema}
    with pytest.raises(InvalidRequest, match="nested too deeply"):
        json_schema_grammar(schema)


WEATHER = {"type": "object", "properties": {"city": {"type": "string"},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city"], "$defs": {"Unused": {"type": "string"}}}
SEARCH = {"type": "object", "properties": {"query": {"$ref": "#/$defs/Q"}},
          "required": ["query"], "$defs": {"Q": {"type": "string", "maxLength": 20}}}
TIME = {"type": "object", "properties": {"zone": {"$ref": "#/$defs/Q"}},
        "required": ["zone"], "$defs": {"Q": {"enum": ["UTC", "CET"]}}}
FUNCTIONS = [("get_weather", WEATHER), ("search", SEARCH), ("get_time", TIME),
             ("ping", {"type": "object", "properties": {}})]


def call(name: str, arguments: Any) -> str:
    body = json.dumps({"name": name, "arguments": arguments})
    return f"<tool_call>\n{body}\n</tool_call>"


def test_tool_call_grammar(vocab: Vocab) -> None:
    gbnf = tool_call_grammar(FUNCTIONS, False)
    for text in [call("get_weather", {"city": "Paris", "unit": "c"}),
                 call("search", {"query": "llama"}), call("get_time", {"zone": "CET"}),
                 call("ping", {}),
                 '<tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo"}}\n</tool_call>']:
        assert grammar_accepts(vocab, gbnf, text), text
    for text in [call("get_wether", {"city": "Paris"}),  # no such function
                 call("search", {"city": "Paris"}),  # another function's arguments
                 call("get_time", {"zone": "PST"}),  # its own $defs/Q, not search's
                 call("search", {"query": "x" * 21}),
                 call("ping", {"x": 1}),
                 '{"name": "ping", "arguments": {}}',  # no block
                 call("ping", {}) + "\n" + call("ping", {}),  # parallel is off
                 'Sure! ' + call("ping", {})]:
        assert not grammar_accepts(vocab, gbnf, text), text


def test_parallel_tool_calls(vocab: Vocab) -> None:
    gbnf = tool_call_grammar(FUNCTIONS, True)
    two = call("get_weather", {"city": "Paris"}) + "\n" + call("get_time", {"zone": "UTC"})
    assert grammar_accepts(vocab, gbnf, two)
    assert grammar_accepts(vocab, gbnf, call("ping", {}))
    assert not grammar_accepts(vocab, gbnf, two + "\n")


def test_tool_parameter_errors_name_the_tool() -> None:
    bad = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 3}}}
    with pytest.raises(InvalidRequest) as caught:
        tool_call_grammar([("ok", WEATHER), ("bad", bad)], True)
    assert caught.value.param == "tools[1].function.parameters"
    assert "'/properties/n/maximum'" in caught.value.message
    assert "function 'bad'" in caught.value.message


def test_grammars_parse_in_llama_cpp(vocab: Vocab) -> None:
    for gbnf in [json_object_grammar(), json_schema_grammar(PERSON),
                 tool_call_grammar(FUNCTIONS, True)]:
        assert grammar_parses(vocab, gbnf)
