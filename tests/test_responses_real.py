"""The Responses API on the real path: the `openai` SDK, a Codex-style request and an
`openai-agents` Agent against `python -m server` running llama.cpp on SmolLM2."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from pydantic import BaseModel, Field

from tests.conftest import LiveServer

MODEL = "smollm2-135m-instruct"
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string",
                                                                     "maxLength": 12}},
                          "required": ["city"], "additionalProperties": False},
           "strict": True}
FORCED: dict[str, Any] = {"tools": [WEATHER], "temperature": 0, "max_output_tokens": 60,
                          "parallel_tool_calls": False,
                          "tool_choice": {"type": "function", "name": "get_weather"}}


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_create_returns_text_and_usage(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="What is the capital of France?",
                                       instructions="Answer in one word.", temperature=0,
                                       max_output_tokens=32)
    assert response.status == "completed" and response.output_text.strip()
    assert response.usage is not None and 0 < response.usage.output_tokens <= 32
    assert response.usage.input_tokens > 10
    assert response.usage.total_tokens == response.usage.input_tokens \
        + response.usage.output_tokens


def test_stream_deltas_reassemble_into_the_final_response(client: openai.OpenAI) -> None:
    with client.responses.stream(model=MODEL, input="Tell me a joke.", temperature=0,
                                 max_output_tokens=40) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert len(deltas) > 1 and "".join(deltas) == final.output_text
    whole = client.responses.create(model=MODEL, input="Tell me a joke.", temperature=0,
                                    max_output_tokens=40)
    assert whole.output_text == final.output_text


def test_tool_round_trip_by_previous_id_and_by_whole_input(client: openai.OpenAI) -> None:
    first = client.responses.create(model=MODEL, input="What is the weather in Paris?",
                                    **FORCED)
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    assert set(json.loads(call.arguments)) == {"city"}
    result = {"type": "function_call_output", "call_id": call.call_id,
              "output": "18 degrees and sunny"}
    answer = dict(tools=[WEATHER], tool_choice="none", temperature=0, max_output_tokens=40)
    chained = client.responses.create(model=MODEL, previous_response_id=first.id,
                                      input=[result], **answer)  # type: ignore[arg-type]
    whole = client.responses.create(model=MODEL, input=[  # type: ignore[arg-type]
        {"role": "user", "content": "What is the weather in Paris?"},
        *[item.model_dump(exclude_none=True) for item in first.output], result], **answer)
    assert chained.output_text.strip() and chained.output[-1].type == "message"
    plain = client.responses.create(model=MODEL, input="What is the weather in Paris?",
                                    max_output_tokens=1)
    assert chained.usage and whole.usage and plain.usage
    # The same conversation either way (the same prompt, so as many tokens), and more than
    # the question alone: the call and its result are in it.
    assert chained.usage.input_tokens == whole.usage.input_tokens > plain.usage.input_tokens


def test_max_output_tokens_makes_it_incomplete(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="Write a long story about a cat.",
                                       max_output_tokens=3)
    assert response.status == "incomplete" and response.usage is not None
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int


def test_json_schema_output_parses(client: openai.OpenAI) -> None:
    response = client.responses.parse(model=MODEL, input="Invent a person.",
                                      text_format=Person, max_output_tokens=80)
    assert isinstance(response.output_parsed, Person)
    assert Person.model_validate_json(response.output_text) == response.output_parsed


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model="gpt-5-codex", input="hi")
    assert caught.value.code == "model_not_found"


def test_codex_style_request_skips_hosted_tools(server: LiveServer) -> None:
    body = {
        "model": MODEL, "instructions": "You are a coding agent.",
        "input": [{"type": "message", "role": "developer",
                   "content": [{"type": "input_text", "text": "Sandbox: read-only."}]},
                  {"type": "message", "role": "user",
                   "content": [{"type": "input_text", "text": "Say hello."}]}],
        "tools": [{"type": "function", "name": "shell", "description": "Run a command.",
                   "strict": False, "parameters": {
                       "type": "object", "properties": {"command": {
                           "type": "array", "items": {"type": "string"}}},
                       "required": ["command"]}},
                  {"type": "local_shell"}, {"type": "web_search"},
                  {"type": "custom", "name": "apply_patch", "description": "Edit files.",
                   "format": {"type": "grammar", "syntax": "lark", "definition": "start: /.+/"}}],
        "tool_choice": "auto", "parallel_tool_calls": False,
        "reasoning": {"effort": "medium", "summary": "auto"}, "store": False, "stream": True,
        "include": ["reasoning.encrypted_content"], "prompt_cache_key": "session-1",
        "max_output_tokens": 24, "temperature": 0}
    reply = httpx.post(f"{server.url}/v1/responses", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    events = [json.loads(line.removeprefix("data: ")) for line in reply.text.splitlines()
              if line.startswith("data: ")]
    final = events[-1]["response"]
    assert events[-1]["type"] in ("response.completed", "response.incomplete")
    assert [tool["name"] for tool in final["tools"]] == ["shell"]
    missing = httpx.get(f"{server.url}/v1/responses/{final['id']}")  # store: false
    assert missing.status_code == 404


def test_agents_sdk_agent_calls_a_python_tool(server: LiveServer) -> None:
    set_tracing_disabled(True)
    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"It is 18 degrees and sunny in {city}."

    async def run() -> Any:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x",
                                      max_retries=0) as sdk:
            agent = Agent(name="weather", instructions="Answer with the weather tool.",
                          model=OpenAIResponsesModel(model=MODEL, openai_client=sdk),
                          tools=[get_weather], model_settings=ModelSettings(
                              tool_choice="get_weather", parallel_tool_calls=False,
                              temperature=0, max_tokens=200))
            return await Runner.run(agent, "What is the weather in Paris?", max_turns=4)

    result = asyncio.run(run())
    assert len(calls) >= 1 and all(isinstance(city, str) and city for city in calls)
    assert isinstance(result.final_output, str) and result.final_output.strip()
