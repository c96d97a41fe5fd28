"""OpenAI tools: validation, the Hermes-style prompt of the generic family, grammar, parsing
(the other families: tests/chat/families/)."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest

from server.chat.calls import CallParser, Content, ToolCall
from server.chat.families.hermes import TRIGGER_PATTERN, TaggedSyntax
from server.chat.families.templates import template_handles_tools
from server.chat.tools import ToolPlan, plan_tools, prepare_messages
from server.errors import InvalidRequest
from tests.grammar_match import Vocab, default_vocab, grammar_accepts, lazy_grammar_accepts

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}
TOOLS = [WEATHER, CLOCK]


@pytest.fixture(scope="module")
def vocab() -> Iterator[Vocab]:
    with default_vocab() as loaded:
        yield loaded


def plan(tool_choice: Any = None, parallel: bool | None = None) -> ToolPlan:
    result = plan_tools(TOOLS, tool_choice, parallel)
    assert result is not None
    return result


def block(name: str, arguments: Any) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def function(**fields: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "f", **fields}}


@pytest.mark.parametrize(("tools", "tool_choice", "parallel", "param"), [
    ("get_weather", None, None, "tools"),
    (["get_weather"], None, None, "tools[0]"),
    ([{"type": "retrieval"}], None, None, "tools[0].type"),
    ([{"type": "function"}], None, None, "tools[0].function"),
    ([WEATHER, {"type": "function", "function": {"description": "x"}}], None, None,
     "tools[1].function.name"),
    ([function(name="get weather")], None, None, "tools[0].function.name"),
    ([function(name="x" * 65)], None, None, "tools[0].function.name"),
    ([WEATHER, CLOCK, WEATHER], None, None, "tools[2].function.name"),
    ([function(description=["x"])], None, None, "tools[0].function.description"),
    ([function(parameters={"type": "array"})], None, None, "tools[0].function.parameters"),
    ([function(parameters="{}")], None, None, "tools[0].function.parameters"),
    ([CLOCK, function(parameters={"properties": {"n": {"type": "integer", "minimum": 1}}},
                      strict=True)], None, None, "tools[1].function.parameters"),
    (TOOLS, "sometimes", None, "tool_choice"),
    (TOOLS, {"type": "function", "function": {"name": "get_wether"}}, None, "tool_choice"),
    (TOOLS, {"type": "function"}, None, "tool_choice"),
    (None, "required", None, "tool_choice"),
    ([], {"type": "function", "function": {"name": "get_time"}}, None, "tool_choice"),
    (TOOLS, "auto", "yes", "parallel_tool_calls"),
])
def test_invalid_tools_name_their_param(tools: Any, tool_choice: Any, parallel: Any,
                                        param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        plan_tools(tools, tool_choice, parallel)
    assert caught.value.param == param
    assert caught.value.message.endswith(".")


def test_a_non_strict_tool_keeps_what_no_grammar_enforces_out_of_its_grammar() -> None:
    """Claude Code's WebFetch has "format": "uri"; MCP tools carry "minimum" and the like:
    a non-strict tool is offered with its whole schema, and its grammar leaves those out."""
    parameters = {"type": "object", "required": ["url", "n", "script"], "properties": {
        "url": {"type": "string", "format": "uri"},
        "n": {"type": "integer", "minimum": 1, "maximum": 9},
        "script": {"type": "string", "maxLength": 524288}}}  # Claude Code's Workflow tool
    plan = plan_tools([function(parameters=parameters)], "required", None)
    assert plan is not None and plan.functions[0].spec()["function"]["parameters"] == parameters
    assert '"url"' in plan.gbnf.replace("\\", "") and "uri" not in plan.gbnf
    with pytest.raises(InvalidRequest, match="uri"):
        plan_tools([function(parameters=parameters, strict=True)], "required", None)


def test_no_plan_without_tools_or_with_none() -> None:
    assert plan_tools(None, None, None) is None
    assert plan_tools([], "auto", None) is None
    assert plan_tools(TOOLS, "none", None) is None
    with pytest.raises(InvalidRequest):  # tools are checked even when none may be called
        plan_tools([{"type": "retrieval"}], "none", None)


def test_plan_modes() -> None:
    auto = plan()
    assert (auto.mode, auto.lazy, auto.parallel, auto.trigger_pattern) == (
        "auto", True, True, TRIGGER_PATTERN)
    assert [f.name for f in auto.functions] == ["get_weather", "get_time"]
    assert auto.functions[1].parameters == {"type": "object", "properties": {}}
    required = plan("required", parallel=False)
    assert (required.mode, required.lazy, required.parallel, required.trigger_pattern) == (
        "required", False, False, "")
    named = plan({"type": "function", "function": {"name": "get_time"}})
    assert (named.mode, named.named, named.lazy) == ("named", "get_time", False)
    assert "get_weather" not in named.gbnf
    assert len(named.functions) == 2  # all are still described to the model


def test_required_grammar(vocab: Vocab) -> None:
    gbnf = plan("required").gbnf
    assert grammar_accepts(vocab, gbnf, block("get_weather", {"city": "Paris"}))
    assert grammar_accepts(vocab, gbnf, block("get_time", {}) + "\n" + block("get_time", {}))
    assert not grammar_accepts(vocab, gbnf, block("get_news", {}))
    assert not grammar_accepts(vocab, gbnf, block("get_weather", {}))
    assert not grammar_accepts(vocab, gbnf, "The weather is fine.")


def test_named_grammar(vocab: Vocab) -> None:
    gbnf = plan({"type": "function", "function": {"name": "get_time"}}, parallel=False).gbnf
    assert grammar_accepts(vocab, gbnf, block("get_time", {}))
    assert not grammar_accepts(vocab, gbnf, block("get_weather", {"city": "Paris"}))


def test_auto_grammar_applies_from_the_trigger(vocab: Vocab) -> None:
    auto = plan()
    call = block("get_weather", {"city": "Paris"})
    assert lazy_grammar_accepts(vocab, auto.gbnf, auto.trigger_pattern, "It is sunny.")
    assert lazy_grammar_accepts(vocab, auto.gbnf, auto.trigger_pattern, "Let me check.\n" + call)
    assert not lazy_grammar_accepts(vocab, auto.gbnf, auto.trigger_pattern,
                                    "Let me check.\n" + block("get_news", {}))


SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
QWEN_LIKE_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n<tools>' }}{%- for tool in tools %}"
    "{{- tool | tojson }}{%- endfor %}{{- '</tools><|im_end|>\\n' }}{%- endif %}")


def test_template_handles_tools() -> None:
    assert template_handles_tools(QWEN_LIKE_TEMPLATE)
    assert template_handles_tools("{% for t in tools | default([]) %}{{ t }}{% endfor %}")
    assert not template_handles_tools(SMOLLM2_TEMPLATE)
    assert not template_handles_tools("You can use tools. {{ messages[0]['content'] }}")
    assert not template_handles_tools("{{ '<tools>' }}{{ message.tools }}")


HISTORY: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "9C"},
    {"role": "assistant", "content": "Paris 18C, Oslo 9C."},
    {"role": "user", "content": "Time?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_3", "type": "function", "function": {"name": "get_time", "arguments": "{"}}]},
]


def test_history_as_text() -> None:
    before = copy.deepcopy(HISTORY)
    messages = prepare_messages(HISTORY, None, native=False)
    assert before == HISTORY
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user",
                                             "assistant"]
    assert messages[1] == {"role": "assistant", "content": "Checking.\n" + block(
        "get_weather", {"city": "Paris"}) + "\n" + block("get_weather", {"city": "Oslo"})}
    assert messages[2] == {"role": "user", "content":
                           "<tool_response>\n18C\n</tool_response>\n"
                           "<tool_response>\n9C\n</tool_response>"}
    assert messages[5]["content"] == block("get_time", "{")  # unparsable arguments kept as text


def test_tools_described_in_a_new_system_message() -> None:
    messages = prepare_messages(HISTORY[:1], plan("required", parallel=False), native=False)
    assert [m["role"] for m in messages] == ["system", "user"]
    system = messages[0]["content"]
    assert system.startswith("# Tools\n\nYou must call one or more functions")
    assert "Call at most one function per reply." in system
    tools_json = re.search(r"<tools>\n(.*)\n</tools>", system, re.DOTALL)
    assert tools_json is not None
    specs = [json.loads(line) for line in tools_json[1].splitlines()]
    assert specs[0] == WEATHER
    assert specs[1]["function"]["parameters"] == {"type": "object", "properties": {}}
    assert system.endswith('<tool_call>\n{"name": <function-name>, "arguments": '
                           "<args-json-object>}\n</tool_call>")


def test_tools_appended_to_the_system_message() -> None:
    chat = [{"role": "system", "content": "Be brief."}, *HISTORY[:1]]
    named = plan({"type": "function", "function": {"name": "get_time"}})
    messages = prepare_messages(chat, named, native=False)
    assert len(messages) == 2
    assert messages[0]["content"].startswith(
        "Be brief.\n\n# Tools\n\nYou must call the function 'get_time'")


def test_native_templates_get_arguments_as_mappings() -> None:
    before = copy.deepcopy(HISTORY)
    messages = prepare_messages(HISTORY, plan(), native=True)
    assert before == HISTORY
    assert [m["role"] for m in messages] == [m["role"] for m in HISTORY]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert messages[1]["tool_calls"][0]["id"] == "call_1"
    assert messages[6]["tool_calls"][0]["function"]["arguments"] == "{"


def parse(chunks: list[str]) -> list[Content | ToolCall]:
    """All items from a parser fed these chunks, adjacent content merged."""
    parser = CallParser(TaggedSyntax())
    items = [item for chunk in chunks for item in parser.feed(chunk)] + parser.flush()
    merged: list[Content | ToolCall] = []
    for item in items:
        if merged and isinstance(item, Content) and isinstance(merged[-1], Content):
            merged[-1] = Content(merged[-1].text + item.text)
        else:
            merged.append(item)
    return merged


def summary(items: list[Content | ToolCall]) -> list[tuple[str, ...]]:
    return [(item.text,) if isinstance(item, Content) else (item.name, item.arguments)
            for item in items]


def both_ways(text: str) -> list[tuple[str, ...]]:
    """The parse of `text` fed whole, checked equal to its parse fed one character at a time."""
    whole = summary(parse([text]))
    assert summary(parse(list(text))) == whole
    return whole


def test_parser_content_then_parallel_calls() -> None:
    text = ("Let me check.\n" + block("get_weather", {"city": "Paris"}) + "\n" +
            block("get_weather", {"city": "Zürich", "days": [1, 2]}) + "\n")
    assert both_ways(text) == [("Let me check.",), ("get_weather", '{"city":"Paris"}'),
                               ("get_weather", '{"city":"Zürich","days":[1,2]}')]


def test_parser_plain_reply_is_kept_exactly() -> None:
    assert both_ways("Hello <b>there</b>,\n  a < b and <tool calls> are fine.\n\n") == [
        ("Hello <b>there</b>,\n  a < b and <tool calls> are fine.\n\n",)]
    assert both_ways("") == []


def test_parser_holds_back_a_possible_tag() -> None:
    parser = CallParser(TaggedSyntax())
    assert parser.feed("Hi <tool_") == [Content("Hi")]
    assert parser.feed("ca") == []
    assert parser.feed("ll>\n{\"name\": \"get_time\", ") == []
    call = parser.feed('"arguments": {}}\n</tool_call>')
    assert len(call) == 1 and isinstance(call[0], ToolCall)
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", call[0].id)
    assert parser.feed("\n\n") == []
    assert parser.flush() == []
    other = CallParser(TaggedSyntax())
    assert other.feed("a <tool") == [Content("a")]
    assert other.feed("box") == [Content(" <toolbox")]


def test_parser_content_after_a_call() -> None:
    assert both_ways(block("get_time", {}) + "\n\nDone. See  you") == [
        ("get_time", "{}"), ("Done. See  you",)]


def test_parser_unterminated_blocks() -> None:
    cut = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_'
    assert both_ways(cut) == [("get_time", '{"zone":"UTC"}')]
    broken = 'Sure.\n<tool_call>\n{"name": "get_time", "argu'
    assert both_ways(broken) == [(broken,)]


def test_parser_invalid_blocks_are_content() -> None:
    for body in ["{not json}", '["get_time", {}]', '{"arguments": {}}',
                 '{"name": "get_time", "arguments": [1]}']:
        text = f"Hm.\n<tool_call>\n{body}\n</tool_call> ok"
        assert both_ways(text) == [(text,)]


def test_parser_accepts_arguments_as_a_json_string() -> None:
    text = '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'
    assert both_ways(text) == [("f", '{"a":1}')]


def test_history_round_trips_through_the_parser() -> None:
    assistant = prepare_messages(HISTORY[:2], None, native=False)[1]["content"]
    calls = HISTORY[1]["tool_calls"]
    assert both_ways(assistant) == [("Checking.",), *[
        (c["function"]["name"], json.dumps(json.loads(c["function"]["arguments"]),
                                           separators=(",", ":"))) for c in calls]]
