"""A tool-call family whose markers are control tokens, on the real engine: the control tokens
the family names (`[TOOL_CALLS]`, `[CALL_ID]`, `[ARGS]`) keep their text in the output, so the
call parses (llama.cpp drops a control token's text unless asked to keep it)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import LiveServer
from tests.gguf_factory import write_gguf

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
MARKERS = ["[TOOL_CALLS]", "[CALL_ID]", "[ARGS]", "[INST]", "[/INST]"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string",
                                                              "maxLength": 12}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    d = tmp_path_factory.mktemp("devstral")
    template = (TEMPLATES / "unsloth-mistral-Devstral-Small-2507.jinja").read_text()
    model = write_gguf(d / "devstral.gguf", "llama", special_tokens=MARKERS,
                       chat_template=template, seed=5)
    registry = d / "models.yaml"
    registry.write_text(f"models:\n  devstral:\n    path: {model}\n    n_ctx: 8192\n")
    live = LiveServer(["--models-file", str(registry)])
    yield live
    live.stop()


def test_control_token_markers_of_a_call_are_kept_and_parsed(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    # The factory numbers special tokens from 3: steer the model onto the control tokens
    # wherever the call grammar allows them, instead of spelling the markers in pieces.
    favour = {str(3 + MARKERS.index(m)): 50 for m in ("[TOOL_CALLS]", "[CALL_ID]", "[ARGS]")}
    reply = client.chat.completions.create(
        model="devstral", messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, max_tokens=200,
        temperature=0,
        logit_bias=favour)  # type: ignore[arg-type]
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city"}
    assert not choice.message.content
