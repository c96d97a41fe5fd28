"""Anthropic's Messages API against the scripted engine, through the `anthropic` SDK: messages
and their streams, the prompt a request becomes, tool use, thinking, count_tokens, errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import pytest
from fastapi import FastAPI

from server.app import create_app
from server.chat.template import prompt_text
from server.engine.fake import CHATML, FakeEngine
from server.registry import ModelSpec, Registry
from server.settings import Settings

pytestmark = pytest.mark.anyio
USER = [{"role": "user", "content": "hi"}]
WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}
HERMES_CALL = ["Let me check.", "\n<tool", '_call>\n{"name": "get_weather", ',
               '"arguments": {"city": "Paris"}}\n</tool_', "call>"]
TEMPLATES = Path(__file__).parents[1] / "data" / "chat_templates"


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def app(engine: FakeEngine, tmp_path: Path) -> FastAPI:
    spec = ModelSpec(id="fake-model", path="unused.gguf")
    registry = Registry({"fake-model": spec}, "fake-model", tmp_path / "models.yaml", tmp_path,
                        tmp_path)
    return create_app(Settings(), engine=engine, registry=registry)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[anthropic.AsyncAnthropic]:
    # This SDK's transport is httpx2 (httpx's successor), which refuses httpx objects.
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test")
    async with anthropic.AsyncAnthropic(base_url="http://test", api_key="x", http_client=http,
                                        max_retries=0) as sdk:
        yield sdk


def prompt_of(engine: FakeEngine) -> str:
    return prompt_text(engine.requests[-1].prompt)  # type: ignore[arg-type]


def blocks(message: anthropic.types.Message) -> list[dict[str, Any]]:
    """The content blocks as the server sent them (a stream's are SDK subclasses)."""
    return [{k: v for k, v in b.model_dump().items() if k not in ("parsed_output", "citations")}
            for b in message.content]


async def test_a_message(client: anthropic.AsyncAnthropic) -> None:
    message = await client.messages.create(model="fake-model", max_tokens=50, messages=USER)
    assert message.id.startswith("msg_") and message.model == "fake-model"
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == \
        [("text", "Hello, world!")]
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    assert message.usage.output_tokens == 4


async def test_a_stream_is_the_same_message(client: anthropic.AsyncAnthropic) -> None:
    whole = await client.messages.create(model="fake-model", max_tokens=50, messages=USER)
    async with client.messages.stream(model="fake-model", max_tokens=50,
                                      messages=USER) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "Hello, world!"
    assert blocks(final) == blocks(whole)
    assert (final.stop_reason, final.usage.output_tokens) == ("end_turn", 4)
    assert final.usage.input_tokens == whole.usage.input_tokens > 0


async def test_stream_events_in_anthropic_order(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/messages", json={
        "model": "fake-model", "max_tokens": 50, "messages": USER, "stream": True})
    names = [line.removeprefix("event: ") for line in response.text.splitlines()
             if line.startswith("event: ")]
    assert names == ["message_start", "content_block_start", *["content_block_delta"] * 4,
                     "content_block_stop", "message_delta", "message_stop"]
    assert "data: [DONE]" not in response.text


async def test_a_request_shaped_as_claude_codes(http: httpx.AsyncClient,
                                               engine: FakeEngine) -> None:
    cached = {"cache_control": {"type": "ephemeral"}}
    body = {
        "model": "fake-model", "max_tokens": 32000, "stream": True,
        "metadata": {"user_id": "user_abc_account__session_1"},
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.101.e51;"
                    " cc_entrypoint=cli; cch=a5145;"},
                   {"type": "text", "text": "You are Claude Code.", **cached}],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>Be careful.</system-reminder>"},
            {"type": "text", "text": "hi", **cached}]}],
        "tools": [{**WEATHER, **cached}], "thinking": {"type": "enabled", "budget_tokens": 31999},
        "context_management": {"edits": []}}
    response = await http.post("/v1/messages?beta=true", json=body, headers={
        "anthropic-version": "2023-06-01", "anthropic-beta": "claude-code-20250219",
        "x-api-key": "unused"})
    assert response.status_code == 200, response.text
    assert "event: message_stop" in response.text
    assert response.headers["x-ignored-fields"] == "context_management"
    prompt = prompt_of(engine)
    assert "billing" not in prompt and "You are Claude Code." in prompt


async def test_system_and_text_blocks_reach_the_prompt(client: anthropic.AsyncAnthropic,
                                                       engine: FakeEngine) -> None:
    await client.messages.create(
        model="fake-model", max_tokens=50,
        system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1; "
                 "cch=a5145;You are terse.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Answer in French."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Bonjour"},
                                               {"type": "text", "text": "ça va ?"}]}],
        metadata={"user_id": "u1"}, extra_headers={"anthropic-beta": "prompt-caching"})
    assert prompt_of(engine) == (
        "<|im_start|>system\nYou are terse.\n\nAnswer in French.<|im_end|>\n"
        "<|im_start|>user\nBonjour\n\nça va ?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("billing", [
    "x-anthropic-billing-header: cc_version=2.1.101.e51; cc_entrypoint=cli; cch=a5145;",
    # Claude Code 2.1.197 sends no cch= stamp; its cc_version suffix follows the user's prompt.
    "x-anthropic-billing-header: cc_version=2.1.197.73f; cc_entrypoint=sdk-cli;",
])
async def test_the_billing_line_leaves_the_prompt_the_same(
        client: anthropic.AsyncAnthropic, engine: FakeEngine, billing: str) -> None:
    await client.messages.create(
        model="fake-model", max_tokens=50, messages=USER,
        system=[{"type": "text", "text": billing}, {"type": "text", "text": "You are terse."}])
    assert prompt_of(engine).startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")


async def test_a_mid_conversation_system_message_stays_in_place(
        http: httpx.AsyncClient, engine: FakeEngine) -> None:
    # Claude Code 2.1.197 (beta mid-conversation-system-2026-04-07) ends its messages with one.
    response = await http.post("/v1/messages?beta=true", json={
        "model": "fake-model", "max_tokens": 50, "system": "You are terse.",
        "messages": [*USER, {"role": "assistant", "content": "Hello."},
                     {"role": "user", "content": "Name a tool."},
                     {"role": "system", "content": [{"type": "text", "text": "Agents: Explore."},
                                                    {"type": "text", "text": "Be brief."}]}]},
        headers={"anthropic-beta": "mid-conversation-system-2026-04-07"})
    assert response.status_code == 200, response.text
    assert prompt_of(engine) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nName a tool.<|im_end|>\n"
        "<|im_start|>system\nAgents: Explore.\n\nBe brief.<|im_end|>\n<|im_start|>assistant\n")


async def test_sampling_fields_reach_the_engine(client: anthropic.AsyncAnthropic,
                                                engine: FakeEngine) -> None:
    # Anthropic's API takes them; this SDK's create() no longer names them.
    await client.messages.create(model="fake-model", max_tokens=7, messages=USER,
                                 extra_body={"temperature": 0.25, "top_p": 0.5, "top_k": 3})
    request = engine.requests[-1]
    assert (request.max_tokens, request.sampling.temperature, request.sampling.top_p,
            request.sampling.top_k) == (7, 0.25, 0.5, 3)
    assert request.grammar is None


async def test_an_output_format_constrains_the_reply(client: anthropic.AsyncAnthropic,
                                                     engine: FakeEngine) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}},
              "required": ["answer"], "additionalProperties": False}
    await client.messages.create(model="fake-model", max_tokens=7, messages=USER,
                                 output_config={"effort": "low", "format": {
                                     "type": "json_schema", "schema": schema}})
    grammar = engine.requests[-1].grammar
    assert grammar is not None and "answer" in grammar.gbnf


async def test_max_tokens_ends_the_reply(client: anthropic.AsyncAnthropic) -> None:
    message = await client.messages.create(model="fake-model", max_tokens=2, messages=USER)
    assert message.content[0].type == "text" and message.content[0].text == "Hello,"
    assert message.stop_reason == "max_tokens"


@pytest.mark.parametrize("stream", [False, True])
async def test_a_stop_sequence_ends_the_reply(client: anthropic.AsyncAnthropic,
                                              stream: bool) -> None:
    kwargs: dict[str, Any] = {"model": "fake-model", "max_tokens": 50, "messages": USER,
                              "stop_sequences": ["!", " world"]}
    if stream:
        async with client.messages.stream(**kwargs) as events:
            message = await events.get_final_message()
    else:
        message = await client.messages.create(**kwargs)
    assert message.content[0].type == "text" and message.content[0].text == "Hello,"
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", " world")


@pytest.mark.parametrize("engine", [FakeEngine(script=HERMES_CALL)])
async def test_tool_use_then_its_result(client: anthropic.AsyncAnthropic,
                                        engine: FakeEngine) -> None:
    message = await client.messages.create(
        model="fake-model", max_tokens=100, tools=[WEATHER], tool_choice={"type": "auto"},
        messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert message.stop_reason == "tool_use"
    text, call = message.content
    assert text.type == "text" and text.text == "Let me check."
    assert call.type == "tool_use" and call.id.startswith("toolu_")
    assert (call.name, call.input) == ("get_weather", {"city": "Paris"})
    await client.messages.create(model="fake-model", max_tokens=100, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [b.model_dump() for b in message.content]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": call.id,
             "content": [{"type": "text", "text": "18 degrees"}]},
            {"type": "text", "text": "And tomorrow?"}]}])
    prompt = prompt_of(engine)
    assert '"name": "get_weather", "arguments": {"city": "Paris"}' in prompt
    assert prompt.endswith("<tool_response>\n18 degrees\n</tool_response><|im_end|>\n"
                           "<|im_start|>user\nAnd tomorrow?<|im_end|>\n<|im_start|>assistant\n")


async def test_a_schema_the_grammar_cannot_enforce_fully(client: anthropic.AsyncAnthropic,
                                                         engine: FakeEngine) -> None:
    # As Claude Code's WebFetch: the grammar enforces the rest; a strict tool is refused.
    fetch = {"name": "fetch", "input_schema": {
        "type": "object", "required": ["url"], "additionalProperties": False,
        "properties": {"url": {"type": "string", "format": "uri"},
                       "format": {"type": "integer", "exclusiveMinimum": 0}}}}
    await client.messages.create(model="fake-model", max_tokens=5, messages=USER,
                                 tools=[fetch], tool_choice={"type": "any"})
    grammar = engine.requests[-1].grammar
    assert grammar is not None and '\\"format\\"' in grammar.gbnf  # the property stays
    with pytest.raises(anthropic.BadRequestError, match="uri"):
        await client.messages.create(model="fake-model", max_tokens=5, messages=USER,
                                     tools=[{**fetch, "strict": True}])  # type: ignore[list-item]


@pytest.mark.parametrize("engine", [FakeEngine(script=HERMES_CALL)])
async def test_streamed_tool_use_assembles(client: anthropic.AsyncAnthropic) -> None:
    async with client.messages.stream(
            model="fake-model", max_tokens=100, tools=[WEATHER],
            tool_choice={"type": "any", "disable_parallel_tool_use": True},
            messages=[{"role": "user", "content": "Weather in Paris?"}]) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use"
    call = final.content[-1]
    assert call.type == "tool_use" and (call.name, call.input) == ("get_weather",
                                                                  {"city": "Paris"})


@pytest.mark.parametrize("engine", [FakeEngine(
    script=['[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'],
    chat_template=(TEMPLATES / "Mistral-Small-3.2-24B-Instruct-2506.jinja").read_text())])
async def test_a_template_that_checks_call_ids_gets_them_back(
        client: anthropic.AsyncAnthropic, engine: FakeEngine) -> None:
    tool_choice: Any = {"type": "tool", "name": "get_weather"}
    message = await client.messages.create(
        model="fake-model", max_tokens=100, tools=[WEATHER], tool_choice=tool_choice,
        messages=[{"role": "user", "content": "Weather in Paris?"}])
    call = message.content[-1]
    assert call.type == "tool_use" and len(call.id) == 9  # Mistral's ids, kept as they are
    await client.messages.create(model="fake-model", max_tokens=100, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [call.model_dump()]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                      "content": "18 degrees", "is_error": True}]}])
    assert f"[TOOL_RESULTS]{call.id}[TOOL_CONTENT]Error: 18 degrees" in prompt_of(engine)


@pytest.mark.parametrize("engine", [FakeEngine(
    script=["<think>", "Two and", " two.", "</think>", "4"],
    chat_template=CHATML + "{# a reasoning model's: </think> #}")])
@pytest.mark.parametrize("thinking", [None, "disabled", "enabled"])
async def test_thinking_blocks_when_asked_for(client: anthropic.AsyncAnthropic,
                                              thinking: str | None) -> None:
    kwargs: dict[str, Any] = {"model": "fake-model", "max_tokens": 2000, "messages": USER}
    if thinking:
        kwargs["thinking"] = {"type": thinking, "budget_tokens": 1024} \
            if thinking == "enabled" else {"type": thinking}
    whole = await client.messages.create(**kwargs)
    async with client.messages.stream(**kwargs) as stream:
        streamed = await stream.get_final_message()
    expected: list[dict[str, Any]] = [{"type": "text", "text": "4"}]
    if thinking == "enabled":
        expected.insert(0, {"type": "thinking", "thinking": "Two and two.", "signature": ""})
    assert blocks(whole) == expected
    assert blocks(streamed) == expected


async def test_count_tokens_counts_the_prompt_the_reply_reads(
        client: anthropic.AsyncAnthropic, http: httpx.AsyncClient) -> None:
    counted = await client.messages.count_tokens(model="fake-model", system="Be brief.",
                                                  messages=USER)
    openai_messages = [{"role": "system", "content": "Be brief."}, *USER]
    tokens = (await http.post("/tokenize", json={"messages": openai_messages})).json()
    assert counted.input_tokens == tokens["count"]
    with_tools = await client.messages.count_tokens(model="fake-model", system="Be brief.",
                                                    messages=USER, tools=[WEATHER])
    assert with_tools.input_tokens > counted.input_tokens


async def test_errors_in_anthropic_shape(client: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        await client.messages.create(model="no-such-model", max_tokens=5, messages=USER)
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as invalid:
        # The SDK checks for max_tokens itself: post the request as another client would.
        await client.post("/v1/messages", cast_to=object,
                          body={"model": "fake-model", "messages": USER})
    body: Any = invalid.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]


async def test_a_key_in_x_api_key(engine: FakeEngine, tmp_path: Path) -> None:
    registry = Registry({"fake-model": ModelSpec(id="fake-model", path="unused.gguf")},
                        "fake-model", tmp_path / "models.yaml", tmp_path, tmp_path)
    app = create_app(Settings(api_keys=["sk-right"]), engine=engine, registry=registry)
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://test")
    async with anthropic.AsyncAnthropic(base_url="http://test", api_key="sk-wrong",
                                        http_client=http, max_retries=0) as sdk:
        with pytest.raises(anthropic.AuthenticationError) as refused:
            await sdk.messages.create(model="fake-model", max_tokens=5, messages=USER)
        assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
        message = await sdk.with_options(api_key="sk-right").messages.create(
            model="fake-model", max_tokens=5, messages=USER)
    assert message.content[0].type == "text" and message.content[0].text == "Hello, world!"


@pytest.mark.parametrize(("change", "words"), [
    ({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "http://x/a.png"}}]}]}, "text only"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools"),
    ({"messages": [*USER, {"role": "assistant", "content": "Sure:"}]}, "prefill"),
    ({"messages": [*USER, {"role": "system", "content": [
        {"type": "tool_result", "tool_use_id": "t1", "content": "x"}]}]}, "text blocks only"),
    ({"messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "t1", "name": "f", "input": {}}]}]}, "assistant message"),
    ({"temperature": 1.5}, "temperature"),
    ({"tool_choice": {"type": "tool"}}, "name"),
])
async def test_what_is_refused_says_why(http: httpx.AsyncClient, change: dict[str, Any],
                                        words: str) -> None:
    body = {"model": "fake-model", "max_tokens": 5, "messages": USER, **change}
    response = await http.post("/v1/messages", json=body)
    assert response.status_code == 400
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert words in error["error"]["message"]


@pytest.mark.parametrize("engine", [FakeEngine(fail_after=2)])
async def test_a_failure_mid_stream_is_an_error_event(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/messages", json={
        "model": "fake-model", "max_tokens": 50, "messages": USER, "stream": True})
    last = response.text.strip().split("\n\n")[-1]
    event, data = last.split("\n")
    assert event == "event: error"
    assert json.loads(data.removeprefix("data: ")) == {"type": "error", "error": {
        "type": "api_error", "message": "The server had an internal error; it was logged."}}
