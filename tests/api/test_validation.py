"""Hostile and careless request bodies: each a 400 naming the field, never a 500 or a silent
ignore (issue 15: lone surrogates, strict numbers, unknown fields, max_tokens caps and
defaults, logit_bias ids, tool results without their call id)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from server.app import create_app
from server.engine.base import GenerationRequest
from server.engine.fake import FakeEngine, _FakeStream
from server.registry import ModelSpec, Registry
from server.settings import Settings

pytestmark = pytest.mark.anyio
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "description": "d",
                                         "parameters": {"type": "object"}}}


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(models=("fake-model", "embedder"), embedding_models=("embedder",))


def make_app(tmp_path: Path, engine: FakeEngine, **settings: Any) -> FastAPI:
    specs = {"fake-model": ModelSpec(id="fake-model", path="x.gguf"),
             "embedder": ModelSpec(id="embedder", path="x.gguf", embedding=True)}
    registry = Registry(specs, "fake-model", tmp_path / "m.yaml", tmp_path, tmp_path)
    return create_app(Settings(**settings), engine=engine, registry=registry)


@pytest.fixture
def app(engine: FakeEngine, tmp_path: Path) -> FastAPI:
    return make_app(tmp_path, engine)


async def post_raw(http: httpx.AsyncClient, path: str, text: str) -> httpx.Response:
    """`text` sent as it is: json= would refuse to encode a lone surrogate."""
    return await http.post(path, content=text.encode(),
                           headers={"content-type": "application/json"})


def chat_text(**fields: str) -> str:
    """A chat body's JSON with `fields` spliced in raw."""
    parts = ['"model": "fake-model"', '"messages": [{"role": "user", "content": "hi"}]']
    parts += [f'"{name}": {value}' for name, value in fields.items()]
    return "{" + ", ".join(parts) + "}"


SURROGATES = [
    (CHAT, '{"model": "fake-model", "messages": [{"role": "user", "content": "a\\ud800"}]}',
     "messages.0.content"),
    (CHAT, '{"model": "fake-\\udc80", "messages": [{"role": "user", "content": "hi"}]}',
     "model"),
    (COMPLETIONS, '{"model": "fake-model", "prompt": "\\ud800"}', "prompt"),
    (COMPLETIONS, '{"model": "fake-model", "prompt": "x", "stop": ["ok", "\\udc80"]}',
     "stop.1"),
    (CHAT, chat_text(tools='[{"type": "function", "function": {"name": "f", "description": '
                           '"\\ud800", "parameters": {"type": "object"}}}]'),
     "tools.0.function.description"),
    (CHAT, chat_text(response_format='{"type": "json_schema", "json_schema": {"name": "a", '
                                     '"schema": {"enum": ["x", "\\ud800"]}}}'),
     "response_format.json_schema.schema.enum.1"),
    (CHAT, chat_text(logit_bias='{"\\ud800": 1}'), "logit_bias.\\ud800"),
    ("/v1/embeddings", '{"model": "embedder", "input": ["ok", "\\ud800"]}', "input.1"),
    ("/tokenize", '{"model": "fake-model", "prompt": "\\udc80"}', "prompt"),
]


@pytest.mark.parametrize(("path", "text", "param"), SURROGATES)
async def test_a_lone_surrogate_anywhere_is_a_400_naming_the_field(
        http: httpx.AsyncClient, path: str, text: str, param: str) -> None:
    response = await post_raw(http, path, text)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert "surrogate" in error["message"]
    assert response.headers["x-request-id"]


class ExplodingEngine(FakeEngine):
    async def generate(self, request: GenerationRequest) -> _FakeStream:
        raise RuntimeError("a bug no handler maps")


async def test_an_unexpected_error_is_a_500_with_the_request_id(tmp_path: Path) -> None:
    app = make_app(tmp_path, ExplodingEngine())
    # raise_app_exceptions (the default) fails the test if the error escapes the app, as it
    # did to uvicorn, which then closed the client's keep-alive connection.
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as http:
        response = await http.post(CHAT, json={"model": "fake-model", "messages": USER},
                                   headers={"x-request-id": "req-42"})
        assert response.status_code == 500
        assert response.headers["x-request-id"] == "req-42"
        assert response.json()["error"]["type"] == "server_error"
        assert "a bug" not in response.text
        # The same client goes on being served.
        assert (await http.get("/health")).status_code == 200


async def test_a_413_carries_the_request_id(tmp_path: Path, engine: FakeEngine) -> None:
    app = make_app(tmp_path, engine, max_body_bytes=1024)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as http:
        response = await http.post(CHAT, json={"model": "fake-model", "messages": USER,
                                               "pad": "x" * 4096})
    assert response.status_code == 413
    assert response.headers["x-request-id"]


@pytest.mark.parametrize(("path", "field", "value"), [
    (COMPLETIONS, "max_tokens", '"4"'), (CHAT, "max_tokens", '"4"'),
    (CHAT, "max_completion_tokens", "4.5"), (CHAT, "temperature", '"0.5"'),
    (CHAT, "n", "true"), (CHAT, "seed", '"7"'), (CHAT, "stream", '"false"'),
    (CHAT, "top_logprobs", '"2"'), (COMPLETIONS, "logprobs", '"1"'),
])
async def test_numbers_are_numbers(http: httpx.AsyncClient, path: str, field: str,
                                   value: str) -> None:
    base = '"prompt": "x"' if path == COMPLETIONS else '"messages": [{"role": "user", ' \
        '"content": "hi"}]'
    response = await post_raw(http, path, f'{{"model": "fake-model", {base}, '
                                          f'"{field}": {value}}}')
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


async def test_integral_numbers_still_pass_as_floats(http: httpx.AsyncClient) -> None:
    response = await http.post(CHAT, json={"model": "fake-model", "messages": USER,
                                           "temperature": 1, "top_p": 1})
    assert response.status_code == 200, response.text


async def test_unknown_fields_are_reported_in_a_header_and_the_log(
        http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "server.requests"):
        response = await http.post(CHAT, json={"model": "fake-model", "messages": USER,
                                               "max_token": 5, "temprature": 0})
    assert response.status_code == 200
    assert response.headers["x-ignored-fields"] == "max_token, temprature"
    assert any("max_token" in r.getMessage() for r in caplog.records)
    clean = await http.post(CHAT, json={"model": "fake-model", "messages": USER})
    assert "x-ignored-fields" not in clean.headers


async def test_reported_field_names_are_printable_ascii(http: httpx.AsyncClient) -> None:
    # A control character in a header value makes the HTTP server drop the connection.
    response = await http.post(CHAT, json={"model": "fake-model", "messages": USER,
                                           "\u001f": None, "a,b": 1, "é": 2})
    assert response.status_code == 200
    header = response.headers["x-ignored-fields"]
    assert header == "\\x1f, a\\x2cb, \\xe9"
    assert all(" " <= c <= "~" for c in header)


async def test_reported_unknown_fields_are_bounded(http: httpx.AsyncClient) -> None:
    fields = {f"f{i}": 1 for i in range(100)}
    response = await http.post(COMPLETIONS, json={"model": "fake-model", "prompt": "x",
                                                  **fields})
    names = response.headers["x-ignored-fields"].split(", ")
    assert names[:2] == ["f0", "f1"] and names[-1] == "(+84)" and len(names) == 17


@pytest.mark.parametrize("body", [
    {"messages": USER},  # chat without max_tokens
    {"prompt": "x", "max_tokens": None},  # completions with null
])
async def test_max_tokens_limit_caps_requests_that_set_none(
        tmp_path: Path, engine: FakeEngine, body: dict[str, Any]) -> None:
    app = make_app(tmp_path, engine, max_tokens_limit=3)
    path = CHAT if "messages" in body else COMPLETIONS
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as http:
        response = await http.post(path, json={"model": "fake-model", **body})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "length"
    assert response.json()["usage"]["completion_tokens"] == 3


async def test_a_chat_without_max_tokens_stops_at_the_server_default(
        tmp_path: Path, engine: FakeEngine) -> None:
    app = make_app(tmp_path, engine, default_max_tokens=2)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as http:
        response = await http.post(CHAT, json={"model": "fake-model", "messages": USER})
    assert response.json()["choices"][0]["finish_reason"] == "length"
    request = engine.requests[-1]
    # A default, not a demand: the engine stops at the context's end if that comes first.
    assert (request.max_tokens, request.default_max_tokens) == (None, 2)


def test_the_default_max_tokens_is_finite() -> None:
    assert 0 < Settings().default_max_tokens <= 16384


@pytest.mark.parametrize(("key", "shown"), [
    ("1000000000", "1000000000"), ("4294967298", "4294967298"),
    ("99999999999999999999999", "99999999999999999999999")])
async def test_logit_bias_outside_the_vocabulary_is_a_400_naming_the_id(
        http: httpx.AsyncClient, key: str, shown: str) -> None:
    response = await http.post(CHAT, json={"model": "fake-model", "messages": USER,
                                           "logit_bias": {key: 5}})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "logit_bias"
    assert shown in error["message"]


async def test_a_tool_message_without_its_call_id_is_a_400(http: httpx.AsyncClient) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "content": "42"}]
    response = await http.post(CHAT, json={"model": "fake-model", "messages": messages,
                                           "tools": [TOOL]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages.2"
    assert "tool_call_id" in error["message"]
    messages[2]["tool_call_id"] = "call_1"
    response = await http.post(CHAT, json={"model": "fake-model", "messages": messages,
                                           "tools": [TOOL]})
    assert response.status_code == 200, response.text
