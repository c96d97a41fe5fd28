"""Fast tests of the HTTP layer against the scripted engine: wire shapes, SSE, errors."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from server.app import create_app
from server.engine.fake import FakeEngine
from server.registry import ModelSpec, ReasoningSpec, Registry, SamplingDefaults
from server.settings import Settings

pytestmark = pytest.mark.anyio
CHAT = "/v1/chat/completions"


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(models=("fake-model", "fake-reasoner"))


@pytest.fixture
def app(engine: FakeEngine, tmp_path: Any) -> FastAPI:
    spec = ModelSpec(id="fake-model", path="unused.gguf", stop=("<|im_end|>",),
                     sampling=SamplingDefaults(temperature=0.3, top_k=7, max_tokens=50))
    reasoner = ModelSpec(id="fake-reasoner", path="unused.gguf",
                         reasoning=ReasoningSpec(separator="\n### Answer:\n"))
    registry = Registry({"fake-model": spec, "fake-reasoner": reasoner}, "fake-model",
                        tmp_path / "models.yaml", tmp_path, tmp_path)
    return create_app(Settings(), engine=engine, registry=registry)




def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], **extra}


def sse_data(response: httpx.Response) -> list[str]:
    assert response.headers["content-type"].startswith("text/event-stream")
    return [line.removeprefix("data: ") for line in response.text.splitlines()
            if line.startswith("data: ")]


async def test_chat_stream_chunks_as_openai_sends_them(http: httpx.AsyncClient) -> None:
    data = sse_data(await http.post(CHAT, json=chat_body(stream=True)))
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    contents = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
    assert "".join(contents) == "Hello, world!"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": "stop"}
    assert all("usage" not in c for c in chunks)  # not asked for: not sent


async def test_include_usage_adds_a_final_usage_chunk(http: httpx.AsyncClient) -> None:
    data = sse_data(await http.post(CHAT, json=chat_body(
        stream=True, stream_options={"include_usage": True})))
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    assert chunks[-1]["usage"]["total_tokens"] == chunks[-1]["usage"]["prompt_tokens"] + 4


async def test_completion_stream_and_n(http: httpx.AsyncClient) -> None:
    data = sse_data(await http.post("/v1/completions", json={
        "model": "fake-model", "prompt": "x", "stream": True, "n": 2}))
    chunks = [json.loads(d) for d in data[:-1]]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert "".join(ch["text"] for ch in mine) == "Hello, world!"
        assert mine[-1]["finish_reason"] == "stop"
    assert data[-1] == "[DONE]"


async def test_stop_string_across_pieces_is_cut(http: httpx.AsyncClient,
                                                engine: FakeEngine) -> None:
    engine.script = ["Hel", "lo wo", "rld", "!"]
    reply = (await http.post(CHAT, json=chat_body(stop="lo w"))).json()
    assert reply["choices"][0]["message"]["content"] == "Hel"
    assert reply["choices"][0]["finish_reason"] == "stop"
    data = sse_data(await http.post(CHAT, json=chat_body(stop=["o wor"], stream=True)))
    text = "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:-1])
    assert text == "Hell"


async def test_error_after_stream_start_is_in_band_then_done(http: httpx.AsyncClient,
                                                             engine: FakeEngine) -> None:
    engine.fail_after = 2
    response = await http.post(CHAT, json=chat_body(stream=True))
    assert response.status_code == 200
    data = sse_data(response)
    assert data[-1] == "[DONE]"
    error = json.loads(data[-2])["error"]
    assert error["type"] == "server_error" and error["message"]


async def test_non_stream_chat_shape(http: httpx.AsyncClient) -> None:
    reply = (await http.post(CHAT, json=chat_body())).json()
    assert list(reply) == ["id", "object", "created", "model", "choices", "usage",
                           "system_fingerprint"]
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": "Hello, world!",
                                              "refusal": None, "reasoning_content": None}
    assert reply["usage"]["completion_tokens"] == 4


async def test_registry_defaults_apply_and_request_overrides(http: httpx.AsyncClient,
                                                             engine: FakeEngine) -> None:
    await http.post(CHAT, json=chat_body())
    silent = engine.requests[-1]
    assert (silent.sampling.temperature, silent.sampling.top_k, silent.max_tokens) == \
        (0.3, 7, 50)
    await http.post(CHAT, json=chat_body(temperature=1.1, top_k=3, max_tokens=5, seed=9))
    loud = engine.requests[-1]
    assert (loud.sampling.temperature, loud.sampling.top_k, loud.max_tokens,
            loud.sampling.seed) == (1.1, 3, 5, 9)


@pytest.mark.parametrize(("body", "status", "param"), [
    (chat_body(model="nope"), 404, "model"),
    (chat_body(temperature="hot"), 400, "temperature"),
    (chat_body(temperature=5), 400, "temperature"),
    (chat_body(n=0), 400, "n"),
    (chat_body(top_logprobs=2), 400, "top_logprobs"),
    (chat_body(top_logprobs=21, logprobs=True), 400, "top_logprobs"),
    (chat_body(tools=[{"type": "function", "function": {"name": "a b"}}]), 400,
     "tools[0].function.name"),
    (chat_body(tool_choice="required"), 400, "tool_choice"),
    (chat_body(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "integer", "minimum": 3}}}), 400,
     "response_format.json_schema.schema"),
    (chat_body(logit_bias={"abc": 1}), 400, "logit_bias"),
    (chat_body(stop=[str(i) for i in range(17)]), 400, "stop"),
    ({"model": "fake-model"}, 400, "messages"),
    (chat_body(messages=[{"role": "wizard", "content": "x"}]), 400, "messages.0.role"),
])
async def test_bad_requests_get_openai_errors(http: httpx.AsyncClient, body: dict[str, Any],
                                              status: int, param: str) -> None:
    response = await http.post(CHAT, json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]


async def test_malformed_json_is_400(http: httpx.AsyncClient) -> None:
    response = await http.post(CHAT, content=b'{"model": ',
                               headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


async def test_models_and_metrics(http: httpx.AsyncClient) -> None:
    models = (await http.get("/v1/models")).json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["fake-model", "fake-reasoner"]
    assert (await http.get("/v1/models/nope")).json()["error"]["code"] == "model_not_found"
    await http.post(CHAT, json=chat_body())
    text = (await http.get("/metrics")).text
    assert 'ggserve:http_requests_total{endpoint="/v1/chat/completions",status="2xx"} 1.0' \
        in text
    assert 'ggserve:requests_total{endpoint="chat",model="fake-model",outcome="ok"} 1.0' in text


REASONED = ["Two", " and two", " make four.\n##", "# Answer:\n", "4", "."]


async def test_reasoning_split_in_json(http: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.script = REASONED
    body = chat_body(model="fake-reasoner")
    message = (await http.post(CHAT, json=body)).json()["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("Two and two make four.", "4.")
    raw = (await http.post(CHAT, json={**body, "reasoning_format": "none"})).json()
    assert raw["choices"][0]["message"]["content"] == "".join(REASONED)
    assert raw["choices"][0]["message"]["reasoning_content"] is None


async def test_reasoning_split_in_stream(http: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.script = REASONED
    data = sse_data(await http.post(CHAT, json=chat_body(model="fake-reasoner", stream=True)))
    deltas = [json.loads(d)["choices"][0]["delta"] for d in data[1:-1]]
    kinds = [k for d in deltas for k in d]
    assert kinds == sorted(kinds, key=lambda k: k == "content")  # reasoning first
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Two and two make four."
    assert "".join(d.get("content", "") for d in deltas) == "4."


async def test_chat_to_a_model_without_template_is_a_clear_400(
        http: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.chat_template = None
    response = await http.post(CHAT, json=chat_body())
    assert response.status_code == 400
    assert "/v1/completions" in response.json()["error"]["message"]
    completion = await http.post("/v1/completions", json={"model": "fake-model", "prompt": "x"})
    assert completion.status_code == 200
