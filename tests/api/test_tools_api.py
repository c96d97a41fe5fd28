"""Tool calls in the HTTP layer, against the scripted engine: the prompt the model gets, and
model text turned into `tool_calls`, streamed as fragments the `openai` SDK assembles."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from server.app import create_app
from server.chat.template import prompt_text
from server.engine.fake import FakeEngine
from server.registry import ModelSpec, Registry
from server.settings import Settings

pytestmark = pytest.mark.anyio
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture
def engine() -> FakeEngine:
    # the model says a few words, then calls, split at awkward places
    pieces = ["Let me check.", "\n<tool", "_call>\n{\"name\": \"get_weather\", ",
              "\"arguments\": {\"city\": \"Paris\"}}\n</tool_", "call>"]
    return FakeEngine(script=pieces)


@pytest.fixture
async def client(engine: FakeEngine, tmp_path: Any) -> AsyncIterator[openai.AsyncOpenAI]:
    spec = ModelSpec(id="fake-model", path="unused.gguf")
    registry = Registry({"fake-model": spec}, "fake-model", tmp_path / "models.yaml", tmp_path,
                        tmp_path)
    app = create_app(Settings(), engine=engine, registry=registry)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    async with openai.AsyncOpenAI(base_url="http://test/v1", api_key="x",
                                  http_client=http) as sdk:
        yield sdk


async def test_model_text_becomes_tool_calls(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


async def test_streamed_tool_calls_assemble(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS,
        stream=True)
    content, name, arguments, finish = "", "", "", None
    async for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for part in delta.tool_calls or []:
            assert part.index == 0
            name += part.function.name or "" if part.function else ""
            arguments += part.function.arguments or "" if part.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert (content, name, json.loads(arguments), finish) == \
        ("Let me check.", "get_weather", {"city": "Paris"}, "tool_calls")


async def test_without_tools_the_text_stays_text(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "Weather?"}])
    assert reply.choices[0].message.tool_calls is None
    assert "<tool_call>" in (reply.choices[0].message.content or "")


async def test_tools_and_history_reach_the_prompt(client: openai.AsyncOpenAI,
                                                  engine: FakeEngine) -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    await client.chat.completions.create(model="fake-model", tools=TOOLS, messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"}])
    prompt = prompt_text(engine.requests[-1].prompt)  # type: ignore[arg-type]
    assert "get_weather" in prompt.split("<|im_start|>user")[0]  # described in the system turn
    assert CALL.replace("\n", "") in prompt.replace("\n", "")
    assert "<tool_response>\n18 degrees\n</tool_response>" in prompt
    assert engine.requests[-1].grammar is not None  # auto: lazy, from "<tool_call>"
    assert engine.requests[-1].grammar.trigger_pattern == "<tool_call>"


CORPUS = Path(__file__).parents[1] / "data" / "chat_templates"


@pytest.mark.parametrize(("template", "pieces"), [
    ("Qwen3-Coder", ["<tool_call>\n<function=get_", "weather>\n<parameter=city>\nPar",
                     "is\n</parameter>\n</function>\n</tool_call>"]),
    ("meta-llama-Llama-3.1-8B-Instruct", ['{"name": "get_weather", "param',
                                          'eters": {"city": "Paris"}}']),
])
async def test_a_family_template_gets_tools_and_its_calls_parse(
        tmp_path: Any, template: str, pieces: list[str]) -> None:
    engine = FakeEngine(script=pieces, chat_template=(CORPUS / f"{template}.jinja").read_text())
    spec = ModelSpec(id="fake-model", path="unused.gguf")
    registry = Registry({"fake-model": spec}, "fake-model", tmp_path / "models.yaml", tmp_path,
                        tmp_path)
    app = create_app(Settings(), engine=engine, registry=registry)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    async with openai.AsyncOpenAI(base_url="http://test/v1", api_key="x",
                                  http_client=http) as sdk:
        reply = await sdk.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS)
        stream = await sdk.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS,
            stream=True)
        streamed = "".join([part.function.arguments or "" async for chunk in stream
                            for part in chunk.choices[0].delta.tool_calls or []
                            if part.function])
    (call,) = reply.choices[0].message.tool_calls or []
    assert (call.function.name, json.loads(call.function.arguments)) == \
        ("get_weather", {"city": "Paris"})
    assert json.loads(streamed) == {"city": "Paris"}
    prompt = prompt_text(engine.requests[0].prompt)  # type: ignore[arg-type]
    assert "Weather in a city" in prompt  # the template rendered the tools itself
    assert "<tools>" not in prompt or template == "Qwen3-Coder"  # not our Hermes description
