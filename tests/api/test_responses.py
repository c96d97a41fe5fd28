"""POST /v1/responses against the scripted engine: the prompt a Responses request becomes, the
output items and stream events the `openai` SDK parses, stored responses, errors by field."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from server.api.protocol.openai_responses_output import Response
from server.api.response_store import ResponseStore
from server.app import create_app
from server.chat.template import prompt_text
from server.engine.fake import FakeEngine
from server.registry import ModelSpec, ReasoningSpec, Registry
from server.settings import Settings

pytestmark = pytest.mark.anyio
CALL_PIECES = ["Let me check.", "\n<tool", "_call>\n{\"name\": \"get_weather\", ",
               "\"arguments\": {\"city\": \"Paris\"}}\n</tool_", "call>"]
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
CODEX_TOOLS = [{"type": "web_search"}, {"type": "local_shell"},
               {"type": "custom", "name": "apply_patch", "format": {"type": "text"}},
               {"type": "mcp", "server_label": "x", "server_url": "http://127.0.0.1:1"}]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(models=("fake-model", "fake-reasoner"))


@pytest.fixture
def app(engine: FakeEngine, tmp_path: Any) -> FastAPI:
    registry = Registry({"fake-model": ModelSpec(id="fake-model", path="unused.gguf"),
                         "fake-reasoner": ModelSpec(id="fake-reasoner", path="unused.gguf",
                                                    reasoning=ReasoningSpec(
                                                        separator="\n### Answer:\n"))},
                        "fake-model", tmp_path / "models.yaml", tmp_path, tmp_path)
    return create_app(Settings(max_tokens_limit=1000), engine=engine, registry=registry)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[openai.AsyncOpenAI]:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    async with openai.AsyncOpenAI(base_url="http://test/v1", api_key="x",
                                  http_client=http, max_retries=0) as sdk:
        yield sdk


def last_prompt(engine: FakeEngine) -> str:
    return prompt_text(engine.requests[-1].prompt)  # type: ignore[arg-type]


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    """Each event's data, after checking that its `event:` line names its type."""
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in response.text.strip().split("\n\n"):
        name, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        events.append(event)
    return events


async def test_text_response(client: openai.AsyncOpenAI) -> None:
    response = await client.responses.create(model="fake-model", input="hi",
                                             instructions="Be brief.")
    assert response.id.startswith("resp_") and response.object == "response"
    assert (response.status, response.output_text) == ("completed", "Hello, world!")
    (item,) = response.output
    assert item.type == "message" and item.id.startswith("msg_") and item.status == "completed"
    assert response.usage is not None and response.usage.output_tokens == 4
    assert response.usage.total_tokens == response.usage.input_tokens + 4
    assert response.instructions == "Be brief."


async def test_stream_reassembles_and_numbers_events(client: openai.AsyncOpenAI) -> None:
    async with client.responses.stream(model="fake-model", input="hi") as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == "Hello, world!"
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.status == "completed" and final.usage is not None


async def test_raw_stream_names_each_event(http: httpx.AsyncClient) -> None:
    events = sse_events(await http.post("/v1/responses", json={
        "model": "fake-model", "input": "hi", "stream": True}))
    ids = {e["item_id"] for e in events if "item_id" in e}
    assert len(ids) == 1 and events[-1]["response"]["output"][0]["id"] in ids
    assert events[0]["response"]["status"] == "in_progress"


async def test_tool_call_whole_and_streamed(client: openai.AsyncOpenAI,
                                            engine: FakeEngine) -> None:
    engine.script = CALL_PIECES
    response = await client.responses.create(model="fake-model", input="Weather?",
                                             tools=[*CODEX_TOOLS, WEATHER])  # type: ignore[list-item]
    message, call = response.output
    assert message.type == "message" and response.output_text == "Let me check."
    assert call.type == "function_call" and call.call_id.startswith("call_")
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    assert [tool.type for tool in response.tools] == ["function"]
    async with client.responses.stream(model="fake-model", input="Weather?",
                                       tools=[WEATHER]) as stream:  # type: ignore[list-item]
        events = [event async for event in stream]
        final = await stream.get_final_response()
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [json.loads(e.arguments) for e in done] == [{"city": "Paris"}]
    assert final.output[1].type == "function_call"


async def test_input_items_become_the_conversation(client: openai.AsyncOpenAI,
                                                   engine: FakeEngine) -> None:
    await client.responses.create(model="fake-model", instructions="Be brief.", input=[
        {"role": "developer", "content": "Use Celsius."},
        {"type": "message", "role": "user", "content": [{"type": "input_text",
                                                         "text": "Weather in Paris?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [],
         "content": [{"type": "reasoning_text", "text": "SECRET RATIONALE"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather",
         "arguments": "{\"city\": \"Paris\"}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "18 C"},
    ], tools=[WEATHER])  # type: ignore[list-item]
    prompt = last_prompt(engine)
    order = ["Be brief.", "Use Celsius.", "Weather in Paris?", "Checking.",
             '{"name": "get_weather", "arguments": {"city": "Paris"}}', "18 C"]
    assert [prompt.index(text) for text in order] == sorted(prompt.index(t) for t in order)
    assert "SECRET RATIONALE" not in prompt


async def test_non_function_tools_are_skipped(client: openai.AsyncOpenAI,
                                              engine: FakeEngine) -> None:
    response = await client.responses.create(model="fake-model", input="hi",
                                             tools=CODEX_TOOLS)  # type: ignore[arg-type]
    assert response.output_text == "Hello, world!" and response.tools == []
    assert engine.requests[-1].grammar is None


@pytest.mark.parametrize(("body", "param"), [
    ({"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "What is this?"},
        {"type": "input_image", "image_url": "data:image/png;base64,AA=="}]}]},
     "input.0.content.1"),
    ({"input": 5}, "input"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role"),
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input.0.type"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input.0.call_id"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}},
     "text.format.schema"),
    ({"input": "hi", "tools": [{"type": "web_search"}, {"type": "function", "name": "bad name"}]},
     "tools[1].name"),
    ({"input": "hi", "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ({"input": "hi", "max_output_tokens": 5000}, "max_output_tokens"),
    ({"input": "hi", "background": True}, "background"),
    ({"input": "hi", "temperature": "0.5"}, "temperature"),
])
async def test_errors_name_the_responses_field(http: httpx.AsyncClient, body: dict[str, Any],
                                               param: str) -> None:
    reply = await http.post("/v1/responses", json={"model": "fake-model", **body})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


async def test_unknown_model_is_not_found(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.responses.create(model="gpt-5", input="hi")
    assert caught.value.code == "model_not_found"


async def test_max_output_tokens_makes_it_incomplete(client: openai.AsyncOpenAI,
                                                     http: httpx.AsyncClient) -> None:
    response = await client.responses.create(model="fake-model", input="hi",
                                             max_output_tokens=2)
    assert response.status == "incomplete" and response.output_text == "Hello,"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"
    events = sse_events(await http.post("/v1/responses", json={
        "model": "fake-model", "input": "hi", "stream": True, "max_output_tokens": 2}))
    assert events[-1]["type"] == "response.incomplete"


async def test_json_schema_format_constrains(client: openai.AsyncOpenAI,
                                             engine: FakeEngine) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    await client.responses.create(model="fake-model", input="hi", text={"format": {
        "type": "json_schema", "name": "thing", "schema": schema, "strict": True}})
    grammar = engine.requests[-1].grammar
    assert grammar is not None and "root" in grammar.gbnf


async def test_reasoning_becomes_a_reasoning_item(client: openai.AsyncOpenAI,
                                                  engine: FakeEngine) -> None:
    engine.script = ["Two and two", " make four.\n##", "# Answer:\n", "4."]
    response = await client.responses.create(model="fake-reasoner", input="2+2?",
                                             reasoning={"effort": "high"})
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and message.type == "message"
    assert reasoning.content is not None and reasoning.id.startswith("rs_")
    assert reasoning.content[0].text == "Two and two make four."
    assert response.output_text == "4."
    async with client.responses.stream(model="fake-reasoner", input="2+2?") as stream:
        events = [event async for event in stream]
    text = "".join(getattr(e, "delta", "") for e in events
                   if e.type == "response.reasoning_text.delta")
    assert text == "Two and two make four."


async def test_previous_response_id_continues(client: openai.AsyncOpenAI,
                                              engine: FakeEngine) -> None:
    first = await client.responses.create(model="fake-model", input="My name is Ada.",
                                          instructions="OLD INSTRUCTIONS")
    second = await client.responses.create(model="fake-model", input="What is my name?",
                                           previous_response_id=first.id)
    prompt = last_prompt(engine)
    assert prompt.index("My name is Ada.") < prompt.index("Hello, world!") \
        < prompt.index("What is my name?")
    assert "OLD INSTRUCTIONS" not in prompt  # instructions are not inherited
    assert second.previous_response_id == first.id
    third = await client.responses.create(model="fake-model", input="And now?",
                                          previous_response_id=second.id)
    assert "My name is Ada." in last_prompt(engine) and third.status == "completed"


async def test_stored_responses_get_delete_and_not_found(client: openai.AsyncOpenAI) -> None:
    stored = await client.responses.create(model="fake-model", input="hi")
    assert (await client.responses.retrieve(stored.id)).output_text == "Hello, world!"
    await client.responses.delete(stored.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(stored.id)
    unstored = await client.responses.create(model="fake-model", input="hi", store=False)
    with pytest.raises(openai.NotFoundError) as caught:
        await client.responses.create(model="fake-model", input="more",
                                      previous_response_id=unstored.id)
    assert caught.value.code == "previous_response_not_found"


async def test_streamed_response_is_stored(client: openai.AsyncOpenAI) -> None:
    async with client.responses.stream(model="fake-model", input="hi") as stream:
        final = await stream.get_final_response()
    assert (await client.responses.retrieve(final.id)).output_text == "Hello, world!"


async def test_failure_mid_stream_is_in_band(http: httpx.AsyncClient,
                                             engine: FakeEngine) -> None:
    engine.fail_after = 2
    events = sse_events(await http.post("/v1/responses", json={
        "model": "fake-model", "input": "hi", "stream": True}))
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert events[-1]["response"]["error"]["code"] == "server_error"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_store_evicts_least_recently_used() -> None:
    store = ResponseStore(max_responses=2)
    kept = [Response(id=f"resp_{i}", created_at=0, model="m") for i in range(3)]
    store.put(kept[0], (), ())
    store.put(kept[1], (), ())
    store.get("resp_0")  # now the most recently used
    store.put(kept[2], (), ())
    assert len(store) == 2 and store.get("resp_0").response is kept[0]
    with pytest.raises(Exception, match="not found"):
        store.get("resp_1")
