"""Anthropic's Messages API on the real llama.cpp engine, driven by the `anthropic` SDK as
Claude Code's clients drive it: SmolLM2 (the default model) for text, streams, stops, tools,
count_tokens and errors; a tiny random-weight GGUF in Memphis-CoT's reasoning format for
thinking blocks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from tests.conftest import LiveServer
from tests.gguf_factory import write_gguf

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
GREEDY = {"temperature": 0.0}  # this SDK's create() no longer names the sampling fields
ASK = [{"role": "user", "content": "Tell me about the sea in three sentences."}]
WEATHER = {"name": "get_weather", "description": "Current weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string",
                                                                      "maxLength": 20}},
                            "required": ["city"]}}


@pytest.fixture(scope="module")
def client(server: LiveServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)


def text_of(message: Any) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


def prompt_length(usage: anthropic.types.Usage) -> int:
    return usage.input_tokens + (usage.cache_read_input_tokens or 0)


def test_a_message(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model=MODEL, max_tokens=40, messages=ASK,
                                     extra_body=GREEDY)
    assert message.id.startswith("msg_") and message.model == MODEL
    assert text_of(message).strip()
    expected = "max_tokens" if message.usage.output_tokens >= 40 else "end_turn"
    assert message.stop_reason == expected


def test_a_stream(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model=MODEL, max_tokens=40, messages=ASK,
                                extra_body=GREEDY) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == text_of(final)
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert 0 < final.usage.output_tokens <= 40
    assert prompt_length(final.usage) > 0  # known at the end, in message_delta


def test_the_system_prompt_is_read_and_counted(client: anthropic.Anthropic,
                                               server: LiveServer) -> None:
    system = "You are a pirate. Answer like one."
    counted = client.messages.count_tokens(model=MODEL, system=system, messages=ASK)
    bare = client.messages.count_tokens(model=MODEL, messages=ASK)
    openai_messages = [{"role": "system", "content": system}, *ASK]
    tokenized = httpx.post(f"{server.url}/tokenize", json={"model": MODEL,
                                                           "messages": openai_messages}).json()
    # (without a system prompt, SmolLM2's template writes its own)
    assert counted.input_tokens == tokenized["count"] != bare.input_tokens
    message = client.messages.create(model=MODEL, max_tokens=5, system=system, messages=ASK)
    assert prompt_length(message.usage) == counted.input_tokens


def test_max_tokens_ends_the_reply(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model=MODEL, max_tokens=3, messages=ASK)
    assert (message.stop_reason, message.usage.output_tokens) == ("max_tokens", 3)


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_sequence_ends_the_reply(client: anthropic.Anthropic, stream: bool) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "max_tokens": 60, "messages": ASK,
                              "stop_sequences": ["zzz", " "], "extra_body": GREEDY}
    if stream:
        with client.messages.stream(**kwargs) as events:
            message = events.get_final_message()
    else:
        message = client.messages.create(**kwargs)
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", " ")
    assert " " not in text_of(message)


def test_tool_use_then_its_result(client: anthropic.Anthropic, server: LiveServer) -> None:
    ask = {"role": "user", "content": "What is the weather in Paris?"}
    message = client.messages.create(
        model=MODEL, max_tokens=80, messages=[ask], tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY)
    assert message.stop_reason == "tool_use"
    call = message.content[-1]
    assert call.type == "tool_use" and call.id.startswith("toolu_")
    assert call.name == "get_weather" and set(call.input) == {"city"}  # type: ignore[arg-type]
    history = [ask, {"role": "assistant", "content": [call.model_dump()]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                             "content": "18 degrees and sunny"}]}]
    reply = client.messages.create(model=MODEL, max_tokens=30, messages=history,
                                   tools=[WEATHER])
    assert reply.stop_reason in ("end_turn", "max_tokens", "tool_use")
    # The round trip renders as the same conversation does through the OpenAI dialect.
    openai_messages = [ask, {"role": "assistant", "content": None, "tool_calls": [{
        "id": call.id, "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps(call.input)}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    tokenized = httpx.post(f"{server.url}/tokenize", json={
        "model": MODEL, "messages": openai_messages,
        "tools": [{"type": "function", "function": {
            "name": WEATHER["name"], "description": WEATHER["description"],
            "parameters": WEATHER["input_schema"]}}]}).json()
    assert prompt_length(reply.usage) == tokenized["count"]


def test_count_tokens_is_the_prompt_a_reply_reads(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(model=MODEL, messages=ASK, tools=[WEATHER])
    message = client.messages.create(model=MODEL, max_tokens=5, messages=ASK, tools=[WEATHER])
    assert prompt_length(message.usage) == counted.input_tokens


def test_errors(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="claude-no-such-model", max_tokens=5, messages=ASK)
    assert "claude-no-such-model" in str(missing.value)
    with pytest.raises(anthropic.BadRequestError) as invalid:
        # The SDK checks for max_tokens itself: post the request as another client would.
        client.post("/v1/messages", cast_to=object, body={"model": MODEL, "messages": ASK})
    assert invalid.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


@pytest.fixture(scope="module")
def reasoner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[anthropic.Anthropic]:
    d = tmp_path_factory.mktemp("reasoner")
    model = write_gguf(d / "stablelm.gguf", "stablelm", add_bos=False, seed=2)
    registry = d / "models.yaml"
    registry.write_text(f"""
models:
  tiny-memphis-reasoning:
    path: {model}
    template: memphis-cot
    reasoning: {{separator: "\\n### Answer:\\n"}}
    stop: ["\\n### User:", "### User:"]
    n_ctx: 256
""")
    live = LiveServer(["--models-file", str(registry)],
                      env={"GGSERVE_TEMPLATES_DIR": str(ROOT / "templates")})
    yield anthropic.Anthropic(base_url=live.url, api_key="x", max_retries=0)
    live.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_a_reasoning_models_rationale_as_thinking_blocks(reasoner: anthropic.Anthropic,
                                                         stream: bool) -> None:
    kwargs: dict[str, Any] = {
        "model": "tiny-memphis-reasoning", "max_tokens": 6, "extra_body": GREEDY,
        "messages": [{"role": "user", "content": "Why is the sky blue?"}],
        "thinking": {"type": "enabled", "budget_tokens": 1024}}
    if stream:
        with reasoner.messages.stream(**kwargs) as events:
            message = events.get_final_message()
    else:
        message = reasoner.messages.create(**kwargs)
    # No "### Answer:" in six tokens of a random model: all of it is the rationale.
    (block,) = message.content
    assert block.type == "thinking" and block.thinking and block.signature == ""
    hidden = reasoner.messages.create(**{**kwargs, "thinking": {"type": "disabled"}})
    assert all(b.type != "thinking" for b in hidden.content)
    assert hidden.usage.output_tokens == message.usage.output_tokens
