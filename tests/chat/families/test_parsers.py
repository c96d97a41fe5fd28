"""Each family's calls: its grammar admits what the model writes, and the parser reads it back
into OpenAI tool calls, the same whole and split at every character boundary."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from server.chat.calls import CallParser, Content, Item
from server.chat.families import llama3, mistral, qwen3_coder
from server.chat.families.base import Family
from server.chat.families.hermes import FAMILY as HERMES
from tests.grammar_match import Vocab, default_vocab, grammar_accepts, lazy_grammar_accepts

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"},
    "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}
CLOCK: dict[str, Any] = {"type": "object", "properties": {}}
FUNCTIONS = [("get_weather", WEATHER), ("get_time", CLOCK)]
SCHEMAS = dict(FUNCTIONS)
PARIS = ("get_weather", '{"city":"Paris","days":2}')


@pytest.fixture(scope="module")
def vocab() -> Iterator[Vocab]:
    with default_vocab() as loaded:
        yield loaded


def parse(family: Family, chunks: list[str]) -> list[tuple[str, ...]]:
    parser = CallParser(family.syntax, SCHEMAS, family.make_id)
    items: list[Item] = [i for chunk in chunks for i in parser.feed(chunk)] + parser.flush()
    out: list[tuple[str, ...]] = []
    for item in items:
        if isinstance(item, Content):
            if out and len(out[-1]) == 1:
                out[-1] = (out[-1][0] + item.text,)
            else:
                out.append((item.text,))
        else:
            out.append((item.name, item.arguments))
    return out


def every_way(family: Family, text: str) -> list[tuple[str, ...]]:
    """The parse of `text` whole, checked equal to it split at each boundary and char by char."""
    whole = parse(family, [text])
    for i in range(1, len(text)):
        assert parse(family, [text[:i], text[i:]]) == whole, (text[:i], text[i:])
    assert parse(family, list(text)) == whole
    return whole


QWEN3_CODER_CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                    "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>")
CASES: list[tuple[Family, str, list[tuple[str, ...]]]] = [
    (HERMES, 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
             '{"city": "Paris", "days": 2}}\n</tool_call>\n', [("Let me check.",), PARIS]),
    (qwen3_coder.FAMILY, "Checking.\n" + QWEN3_CODER_CALL + "\n" +
     "<tool_call>\n<function=get_time>\n</function>\n</tool_call>",
     [("Checking.",), PARIS, ("get_time", "{}")]),
    (llama3.FAMILY, '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}',
     [PARIS]),
    (llama3.FAMILY, '<|python_tag|>{"name": "get_weather", "parameters": '
                    '{"city": "Paris", "days": 2}}', [PARIS]),
    (mistral.FAMILY, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", '
                     '"days": 2}, "id": "abcDEF123"}, {"name": "get_time", "arguments": {}, '
                     '"id": "x"}]', [PARIS, ("get_time", "{}")]),
    (mistral.FAMILY, '[{"name": "get_time", "arguments": {}}]', [("get_time", "{}")]),
    (mistral.ARGS_FAMILY, 'Sure.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "days": 2}'
                          '[TOOL_CALLS]get_time[CALL_ID]abcDEF123[ARGS]{}',
     [("Sure.",), PARIS, ("get_time", "{}")]),
]


@pytest.mark.parametrize(("family", "text", "expected"), CASES,
                         ids=[f"{c[0].name}-{i}" for i, c in enumerate(CASES)])
def test_calls_parse_whole_and_streamed(family: Family, text: str,
                                        expected: list[tuple[str, ...]]) -> None:
    assert every_way(family, text) == expected


@pytest.mark.parametrize("family", [HERMES, qwen3_coder.FAMILY, llama3.FAMILY, mistral.FAMILY,
                                    mistral.ARGS_FAMILY], ids=lambda f: f.name)
def test_plain_replies_stay_text(family: Family) -> None:
    text = "Hello <b>there</b> [1] {x} a < b\n\n"
    assert every_way(family, text) == [(text,)]
    assert every_way(family, "") == []


def test_qwen3_coder_values_follow_the_schema() -> None:
    text = ("<tool_call>\n<function=get_weather>\n<parameter=city>\n12\n</parameter>\n"
            "<parameter=days>\n3\n</parameter>\n<parameter=unit>\ncelsius\n</parameter>\n"
            "</function>\n</tool_call>")
    assert every_way(qwen3_coder.FAMILY, text) == [
        ("get_weather", '{"city":"12","days":3,"unit":"celsius"}')]


def test_llama3_calls_only_open_the_reply() -> None:
    text = 'Use {"name": "get_time", "parameters": {}} to ask.'
    assert every_way(llama3.FAMILY, text) == [(text,)]
    json_reply = '  {"answer": 4}'
    assert every_way(llama3.FAMILY, json_reply) == [(json_reply,)]


def test_mistral_ids_are_nine_characters() -> None:
    parser = CallParser(mistral.FAMILY.syntax, SCHEMAS, mistral.FAMILY.make_id)
    items = parser.feed('[TOOL_CALLS][{"name": "get_time", "arguments": {}, "id": "abcDEF123"},'
                        ' {"name": "get_time", "arguments": {}}]') + parser.flush()
    ids = [getattr(item, "id", "") for item in items]
    assert ids[0] == "abcDEF123" and len(ids[1]) == 9 and ids[1].isalnum()


def test_cut_off_blocks() -> None:
    assert every_way(qwen3_coder.FAMILY, QWEN3_CODER_CALL[:-8]) == [PARIS]
    cut = '{"name": "get_time", "parame'
    assert every_way(llama3.FAMILY, cut) == [(cut,)]


GRAMMAR_CASES: list[tuple[Family, str, list[str]]] = [
    (qwen3_coder.FAMILY, QWEN3_CODER_CALL, [
        QWEN3_CODER_CALL.replace("Paris", "Par\n</parameter>is"),
        QWEN3_CODER_CALL.replace("<parameter=city>\nParis\n</parameter>\n", ""),
        QWEN3_CODER_CALL.replace("\n2\n", "\ntwo\n")]),
    (llama3.FAMILY, '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}',
     ['{"name": "get_weather", "parameters": {"days": 2}}',
      '{"name": "get_news", "parameters": {}}']),
    (mistral.FAMILY, '[TOOL_CALLS][{"name": "get_time", "arguments": {}, "id": "abcDEF123"}]',
     ['[TOOL_CALLS][{"name": "get_time", "arguments": {}, "id": "abc"}]',
      '[{"name": "get_time", "arguments": {}, "id": "abcDEF123"}]']),
    (mistral.ARGS_FAMILY, '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}',
     ['[TOOL_CALLS]get_weather[ARGS]{"town": "Paris"}', '[TOOL_CALLS]get_news[ARGS]{}']),
]


@pytest.mark.parametrize(("family", "good", "bad"), GRAMMAR_CASES,
                         ids=[c[0].name for c in GRAMMAR_CASES])
def test_grammars_admit_only_valid_calls(vocab: Vocab, family: Family, good: str,
                                         bad: list[str]) -> None:
    gbnf = family.grammar(FUNCTIONS, False)
    assert grammar_accepts(vocab, gbnf, good)
    for text in bad:
        assert not grammar_accepts(vocab, gbnf, text), text
    assert lazy_grammar_accepts(vocab, gbnf, family.trigger, "Plain words.")
    assert parse(family, [good])[-1][0] in {"get_weather", "get_time"}


def test_parallel_grammars(vocab: Vocab) -> None:
    two = QWEN3_CODER_CALL + "\n<tool_call>\n<function=get_time>\n</function>\n</tool_call>"
    assert grammar_accepts(vocab, qwen3_coder.FAMILY.grammar(FUNCTIONS, True), two)
    assert not grammar_accepts(vocab, qwen3_coder.FAMILY.grammar(FUNCTIONS, False), two)
    args = '[TOOL_CALLS]get_time[ARGS]{}[TOOL_CALLS]get_time[CALL_ID]abcDEF123[ARGS]{}'
    assert grammar_accepts(vocab, mistral.ARGS_FAMILY.grammar(FUNCTIONS, True), args)
    nemo = ('[TOOL_CALLS][{"name": "get_time", "arguments": {}, "id": "abcDEF123"}, '
            '{"name": "get_time", "arguments": {}, "id": "abcDEF124"}]')
    assert grammar_accepts(vocab, mistral.FAMILY.grammar(FUNCTIONS, True), nemo)


def test_lazy_llama3_grammar_applies_only_to_a_reply_that_opens_with_a_call(vocab: Vocab) -> None:
    gbnf, trigger = llama3.FAMILY.grammar(FUNCTIONS, False), llama3.FAMILY.trigger
    assert lazy_grammar_accepts(vocab, gbnf, trigger, 'Try {"name": "x"} later.')
    assert not lazy_grammar_accepts(vocab, gbnf, trigger, '{"name": "get_news", "parameters": {}}')
