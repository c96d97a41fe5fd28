"""Structured output and tool calls through the `openai` SDK on the real engine: llama.cpp
grammars make even a 135M model's output parse and validate."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest

from tests.conftest import LiveServer

MODEL = "smollm2-135m-instruct"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer"},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string",
                                                                 "maxLength": 30}},
                   "required": ["timezone"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
ASK = [{"role": "user", "content": "What is the weather in Paris and the time in Tokyo?"}]


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    args: dict[str, Any] = {"model": MODEL, "temperature": 0, "max_tokens": 160,
                            "messages": [{"role": "user", "content": "Describe a person."}]}
    return client.chat.completions.create(**{**args, **kwargs})


def streamed_text(client: openai.OpenAI, **kwargs: Any) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chat(client, stream=True, **kwargs)
                   if c.choices)


# ---------------------------------------------------------------- response_format ---------


def test_json_object_parses(client: openai.OpenAI) -> None:
    reply = chat(client, response_format={"type": "json_object"}, temperature=0.7, seed=3)
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


@pytest.mark.parametrize("seed", [1, 2])
def test_json_schema_validates_streamed_or_not(client: openai.OpenAI, seed: int) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                  "strict": True}}
    reply = chat(client, response_format=fmt, temperature=0.8, seed=seed)
    whole = reply.choices[0].message.content
    jsonschema.validate(json.loads(whole), PERSON)
    text = streamed_text(client, response_format=fmt, temperature=0.8, seed=seed)
    assert text == whole


def test_json_schema_on_completions(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    reply = client.completions.create(model=MODEL, prompt="A person as JSON:", max_tokens=160,
                                      temperature=0, extra_body={"response_format": fmt})
    jsonschema.validate(json.loads(reply.choices[0].text), PERSON)


def test_unsupported_schema_is_a_400_naming_the_part(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "not": {"const": 3}}}}
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, response_format={"type": "json_schema",
                                      "json_schema": {"name": "x", "schema": schema}})
    assert "/properties/n/not" in str(err.value)
    with pytest.raises(openai.BadRequestError, match="json_schema"):
        chat(client, response_format={"type": "json_schema"})
    with pytest.raises(openai.BadRequestError, match="response_format"):
        chat(client, response_format={"type": "yaml"})


# ---------------------------------------------------------------- tools -------------------


def check_calls(calls: Any, names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_tool_calls_are_valid(client: openai.OpenAI) -> None:
    reply = chat(client, messages=ASK, tools=[WEATHER, TIME], tool_choice="required")
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    check_calls(choice.message.tool_calls, {"get_weather", "get_time"})


def test_named_function_and_no_parallel_calls(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    reply = chat(client, messages=ASK, tools=[WEATHER, TIME], tool_choice=named,
                 parallel_tool_calls=False)
    calls = reply.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 1
    check_calls(calls, {"get_time"})


def test_streamed_tool_calls_assemble_as_the_sdk_does(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(messages=ASK, tools=[WEATHER, TIME], tool_choice="required")
    whole = chat(client, **kwargs).choices[0].message.tool_calls
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in chat(client, stream=True, **kwargs):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for part in choice.delta.tool_calls or []:
                call = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += part.id or ""
                call["name"] += part.function.name or "" if part.function else ""
                call["arguments"] += part.function.arguments or "" if part.function else ""
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in whole]


def test_auto_gives_text_or_valid_calls_and_results_render(client: openai.OpenAI) -> None:
    reply = chat(client, messages=ASK, tools=[WEATHER, TIME])
    message = reply.choices[0].message
    if message.tool_calls:
        check_calls(message.tool_calls, {"get_weather", "get_time"})
    else:
        assert message.content
    # the next turn: the assistant's call and the tool's result go back through the template
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather",
                         "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]
    answer = chat(client, messages=history, tools=[WEATHER, TIME], tool_choice="none",
                  max_tokens=32)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    assert answer.usage.prompt_tokens > chat(client, messages=ASK, max_tokens=1).usage.prompt_tokens


def test_tool_errors_name_the_field(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, messages=ASK, tools=[WEATHER],
             tool_choice={"type": "function", "function": {"name": "nope"}})
    assert err.value.body["param"] == "tool_choice"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, messages=ASK, tools=[{"type": "function", "function": {"name": "a b"}}])
    assert "tools[0]" in str(err.value.body["param"])  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="response_format"):
        chat(client, messages=ASK, tools=[WEATHER], tool_choice="required",
             response_format={"type": "json_object"})
