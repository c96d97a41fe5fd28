"""Ollama's API (/api/*) against the scripted engine: NDJSON streams and whole replies, options
mapped onto the engine's parameters, tool calls with object arguments, thinking, embeddings,
model listings read from GGUF headers, pull progress, and errors in Ollama's shape. The
`ollama` client reads every reply."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import gguf
import httpx
import numpy as np
import ollama
import pytest
from fastapi import FastAPI

from server.app import create_app
from server.chat.template import prompt_text
from server.engine.base import is_token_ids
from server.engine.fake import CHATML, FakeEngine
from server.gguf_metadata import read_metadata
from server.registry import ModelSpec, Registry
from server.settings import Settings
from tests.gguf_factory import write_gguf

pytestmark = pytest.mark.anyio
THINKING = CHATML + "{# </think> #}"  # a template that closes a rationale: a reasoning format
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(models=("chat", "base", "embed", "remote"), embedding_models=("embed",),
                      n_ctx=64)


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    write_gguf(tmp_path / "chat.gguf", "llama", chat_template=CHATML)
    specs = {"chat": ModelSpec(id="chat", path="chat.gguf", stop=("<|im_end|>",)),
             "base": ModelSpec(id="base", path="chat.gguf", template="none"),
             "embed": ModelSpec(id="embed", path="chat.gguf", embedding=True),
             "remote": ModelSpec(id="remote", repo="org/remote-GGUF", file="r.{quant}.gguf",
                                 quant="Q4_0", quants=("Q4_0", "Q8_0"))}
    return Registry(specs, "chat", tmp_path / "models.yaml", tmp_path, tmp_path / "models")


def make_app(engine: FakeEngine, registry: Registry, **settings: Any) -> FastAPI:
    return create_app(Settings(**settings), engine=engine, registry=registry)


@pytest.fixture
def app(engine: FakeEngine, registry: Registry) -> FastAPI:
    return make_app(engine, registry)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[ollama.AsyncClient]:
    yield ollama.AsyncClient(host="http://test", transport=httpx.ASGITransport(app=app))


def lines(reply: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line) for line in reply.text.splitlines()]


def user(text: str = "Hi") -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def test_version_is_a_semver(http: httpx.AsyncClient) -> None:
    version = (await http.get("/api/version")).json()["version"]
    assert [int(part) for part in version.split(".")] >= [0, 6, 4]


async def test_chat_streams_ndjson_by_default(http: httpx.AsyncClient) -> None:
    reply = await http.post("/api/chat", json={"model": "chat", "messages": user()})
    assert reply.headers["content-type"].startswith("application/x-ndjson")
    *pieces, last = lines(reply)
    assert "".join(p["message"]["content"] for p in pieces) == "Hello, world!"
    assert all(p["done"] is False and p["message"]["role"] == "assistant" for p in pieces)
    assert last["done"] is True and last["done_reason"] == "stop"
    assert last["eval_count"] == 4 and last["prompt_eval_count"] > 0
    assert last["total_duration"] >= last["eval_duration"] >= 0


async def test_the_client_reads_whole_and_streamed_chats(client: ollama.AsyncClient) -> None:
    whole = await client.chat(model="chat", messages=user(), stream=False)
    assert whole.message.content == "Hello, world!" and whole.done_reason == "stop"
    assert whole.eval_count == 4
    parts = [part async for part in await client.chat(model="chat:latest", messages=user(),
                                                      stream=True)]
    assert "".join(p.message.content or "" for p in parts) == "Hello, world!"
    assert parts[-1].done and parts[-1].model == "chat:latest"


async def test_options_become_the_engines_parameters(http: httpx.AsyncClient,
                                                     engine: FakeEngine) -> None:
    reply = await http.post("/api/chat", json={
        "model": "chat", "messages": user(), "stream": False, "keep_alive": "5m",
        "format": "json", "options": {"temperature": 0, "top_k": 7, "top_p": 0.5, "seed": 3,
                                      "num_predict": 2, "stop": ["x"], "repeat_penalty": 1.1,
                                      "num_ctx": 4096, "num_gpu": 99}})
    assert reply.status_code == 200, reply.text
    request = engine.requests[-1]
    assert (request.sampling.temperature, request.sampling.top_k, request.sampling.top_p,
            request.sampling.seed, request.sampling.repeat_penalty) == (0, 7, 0.5, 3, 1.1)
    assert request.max_tokens == 2 and request.stop == ("x",) and request.keep_alive == 300
    assert request.grammar is not None and not request.stream
    assert reply.json()["done_reason"] == "length"
    # load settings belong to models.yaml: accepted, named as ignored
    assert reply.headers["x-ignored-fields"] == "options.num_ctx, options.num_gpu"


async def test_a_format_schema_constrains_the_reply(http: httpx.AsyncClient,
                                                    engine: FakeEngine) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    await http.post("/api/generate", json={"model": "chat", "prompt": "Hi", "format": schema})
    grammar = engine.requests[-1].grammar
    assert grammar is not None and '\\"a\\"' in grammar.gbnf


async def test_keep_alive_means_what_it_means_on_v1(http: httpx.AsyncClient,
                                                    engine: FakeEngine) -> None:
    for given, seconds in [(0, 0.0), (-1, -1.0), ("1h30m", 5400.0), (90, 90.0)]:
        await http.post("/api/chat", json={"model": "chat", "messages": user(),
                                           "keep_alive": given, "stream": False})
        assert engine.requests[-1].keep_alive == seconds


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/api/chat", {"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]},
     "messages.0.images"),
    ("/api/chat", {"messages": user(), "options": {"mirostat": 2}}, "options.mirostat"),
    ("/api/chat", {"messages": user(), "options": {"temperature": 9}}, "options.temperature"),
    ("/api/chat", {"messages": user(), "think": "high"}, "think"),
    ("/api/chat", {"messages": user(), "think": True}, "think"),
    ("/api/chat", {"messages": user(), "logprobs": True}, "logprobs"),
    ("/api/chat", {"messages": user(), "keep_alive": "soon"}, "keep_alive"),
    ("/api/chat", {"messages": user(), "format": "xml"}, "format"),
    ("/api/generate", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("/api/generate", {"prompt": "x", "raw": True, "system": "s"}, "system"),
    ("/api/embed", {"input": ["a", ""]}, "input.1"),
])
async def test_refusals_are_400s_naming_the_field(http: httpx.AsyncClient, path: str,
                                                  body: dict[str, Any], field: str) -> None:
    reply = await http.post(path, json={"model": "embed" if "embed" in path else "chat", **body})
    assert reply.status_code == 400
    assert list(reply.json()) == ["error"] and field in reply.json()["error"]


async def test_an_unknown_model_is_a_404_the_client_raises(client: ollama.AsyncClient,
                                                           http: httpx.AsyncClient) -> None:
    reply = await http.post("/api/chat", json={"model": "nope", "messages": user()})
    assert reply.status_code == 404 and "nope" in reply.json()["error"]
    with pytest.raises(ollama.ResponseError) as caught:
        await client.show("nope")
    assert caught.value.status_code == 404 and "nope" in caught.value.error


async def test_a_failure_mid_stream_is_an_error_line(registry: Registry) -> None:
    app = make_app(FakeEngine(models=("chat",), fail_after=2), registry)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as http:
        reply = await http.post("/api/generate", json={"model": "chat", "prompt": "Hi"})
    assert reply.status_code == 200
    assert lines(reply)[-1] == {"error": "The server had an internal error; it was logged."}


async def test_tool_calls_carry_object_arguments(client: ollama.AsyncClient,
                                                 engine: FakeEngine) -> None:
    engine.script = ["Checking.", '\n<tool_call>\n{"name": "get_weather", ',
                     '"arguments": {"city": "Paris"}}\n</tool_call>']
    for stream in (False, True):
        reply = await client.chat(model="chat", messages=user("Weather?"), tools=TOOLS,
                                  stream=stream)
        parts = [p async for p in reply] if stream else [reply]  # type: ignore[union-attr]
        calls = [c for p in parts for c in p.message.tool_calls or []]  # type: ignore[union-attr]
        assert [(c.function.name, c.function.arguments) for c in calls] == \
            [("get_weather", {"city": "Paris"})]
    # the call and its result go back; the result pairs with the call by function name
    history = [*user("Weather?"), {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "Sunny, 21 C"}]
    await client.chat(model="chat", messages=history, tools=TOOLS, stream=False)
    prompt = engine.requests[-1].prompt
    assert not is_token_ids(prompt)
    text = prompt_text(prompt)
    assert '"city": "Paris"' in text and "Sunny, 21 C" in text


async def test_thinking_is_split_off_and_hidden_by_think_false(registry: Registry) -> None:
    engine = FakeEngine(models=("chat",), chat_template=THINKING,
                        script=["<think>", "Hmm.", "</think>", "Yes."])
    client = ollama.AsyncClient(host="http://test",
                                transport=httpx.ASGITransport(app=make_app(engine, registry)))
    shown = await client.chat(model="chat", messages=user(), think=True, stream=False)
    assert (shown.message.thinking, shown.message.content) == ("Hmm.", "Yes.")
    hidden = await client.generate(model="chat", prompt="Hi", think=False, stream=False)
    assert (hidden.thinking, hidden.response) == (None, "Yes.")


async def test_generate_renders_the_template_unless_raw(http: httpx.AsyncClient,
                                                        engine: FakeEngine) -> None:
    reply = await http.post("/api/generate", json={"model": "chat", "prompt": "Hi",
                                                   "system": "Be brief.", "stream": False})
    assert reply.json()["response"] == "Hello, world!" and "context" not in reply.json()
    assert prompt_text(engine.requests[-1].prompt).startswith(  # type: ignore[arg-type]
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>")
    for raw in (True, False):  # without a chat template (a base model) the prompt is the prompt
        await http.post("/api/generate", json={"model": "chat", "prompt": "Once", "raw": raw})
        assert prompt_text(engine.requests[-1].prompt) == "Once"  # type: ignore[arg-type]
        engine.chat_template = None


async def test_no_prompt_loads_and_keep_alive_0_unloads(http: httpx.AsyncClient) -> None:
    loaded = (await http.post("/api/generate", json={"model": "chat"})).json()
    assert loaded["done"] and loaded["done_reason"] == "load" and loaded["response"] == ""
    unloaded = (await http.post("/api/chat", json={"model": "chat", "messages": [],
                                                   "keep_alive": 0})).json()
    assert unloaded["done_reason"] == "unload" and unloaded["message"]["content"] == ""


async def test_embed_truncates_and_shortens(client: ollama.AsyncClient,
                                            http: httpx.AsyncClient) -> None:
    reply = await client.embed(model="embed", input=["ab", "cd"])
    assert len(reply.embeddings) == 2 and reply.embeddings[0] != reply.embeddings[1]
    assert all(math.isclose(math.hypot(*v), 1.0) for v in reply.embeddings)
    short = await client.embed(model="embed", input="ab", dimensions=3)
    assert len(short.embeddings[0]) == 3 and math.isclose(math.hypot(*short.embeddings[0]), 1)
    long = "x" * 100  # over the fake's n_ctx of 64: cut to it unless truncate is false
    assert len((await client.embed(model="embed", input=long)).embeddings) == 1
    refused = await http.post("/api/embed", json={"model": "embed", "input": long,
                                                  "truncate": False})
    assert refused.status_code == 400 and "64" in refused.json()["error"]
    with_options = await http.post("/api/embed", json={"model": "embed", "input": "ab",
                                                       "options": {"num_ctx": 8, "seed": 1}})
    assert with_options.headers["x-ignored-fields"] == "options.num_ctx, options.seed"
    legacy = await client.embeddings(model="embed", prompt="ab")
    assert list(legacy.embedding) == reply.embeddings[0]
    assert (await client.embed(model="embed", input=[])).embeddings == []


async def test_tags_list_only_files_on_disk_with_their_header(client: ollama.AsyncClient,
                                                              tmp_path: Path) -> None:
    listed = {m.model: m for m in (await client.list()).models}
    assert set(listed) == {"chat", "base", "embed"}  # "remote" is not downloaded
    chat = listed["chat"]
    assert chat.size == (tmp_path / "chat.gguf").stat().st_size
    assert chat.details is not None and chat.details.format == "gguf"
    assert (chat.details.family, chat.details.quantization_level) == ("llama", "F32")
    assert len(chat.digest or "") == 64 and chat.digest == listed["base"].digest


async def test_show_gives_template_metadata_and_capabilities(client: ollama.AsyncClient) -> None:
    chat = await client.show("chat")
    assert chat.template == CHATML and chat.capabilities == ["completion", "tools"]
    assert chat.modelinfo is not None and chat.modelinfo["general.architecture"] == "llama"
    assert chat.modelinfo["llama.context_length"] == 64  # the context served, not trained
    assert chat.modelinfo["general.basename"] == "chat"  # not the file's: "base" shares it
    assert 'PARAMETER stop "<|im_end|>"' in (chat.modelfile or "")
    assert (await client.show("embed")).capabilities == ["embedding"]
    assert (await client.show("base")).capabilities == ["completion"]


async def test_ps_lists_loaded_models(client: ollama.AsyncClient) -> None:
    running = {m.model: m for m in (await client.ps()).models}
    assert running["chat"].context_length == 64 and running["chat"].expires_at is not None
    assert running["chat"].details is not None
    assert running["chat"].details.family == "llama"


async def test_pull_reports_progress_and_is_admin_only(engine: FakeEngine, registry: Registry,
                                                       client: ollama.AsyncClient) -> None:
    steps = [s.status async for s in await client.pull("chat", stream=True)]
    assert steps[0] == "pulling manifest" and steps[-1] == "success"
    assert (await client.pull("remote", stream=False)).status == "success"
    with pytest.raises(ollama.ResponseError) as caught:
        await client.pull("nope")
    assert caught.value.status_code == 404
    app = make_app(engine, registry, api_keys=["user"], admin_keys=["admin"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as http:
        refused = await http.post("/api/pull", json={"model": "chat"},
                                  headers={"Authorization": "Bearer user"})
        allowed = await http.post("/api/pull", json={"model": "chat", "stream": False},
                                  headers={"Authorization": "Bearer admin"})
    assert refused.status_code == 403 and isinstance(refused.json()["error"], str)
    assert allowed.json() == {"status": "success"}


async def test_openapi_documents_ollamas_error_shape(http: httpx.AsyncClient) -> None:
    paths = (await http.get("/openapi.json")).json()["paths"]
    for path in ("/api/chat", "/api/embed", "/api/pull"):
        assert paths[path]["post"]["responses"]["404"]["content"]["application/json"][
            "schema"]["$ref"].endswith("/OllamaError")


def test_the_header_reader_agrees_with_the_gguf_package(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", "llama", chat_template="{{ x }}", dtype="q8_0")
    ours = read_metadata(path)
    theirs = gguf.GGUFReader(path)
    assert ours.parameter_count == sum(int(np.prod(t.shape)) for t in theirs.tensors)
    assert (ours.architecture, ours.quantization) == ("llama", "Q8_0")
    assert ours.values["tokenizer.chat_template"] == "{{ x }}"
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="cut short"):
        read_metadata(cut)


async def test_odd_option_names_are_reported_in_printable_ascii(http: httpx.AsyncClient) -> None:
    """schemathesis found it: a control character or non-ASCII letter in an ignored option's
    name broke the X-Ignored-Fields header and the response with it (a 500)."""
    reply = await http.post("/api/chat", json={
        "model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": False,
        "options": {"\u0004caf\u00e9": 1, "typical_p": 0.5}})
    assert reply.status_code == 400 and "typical_p" in reply.json()["error"]
    assert reply.headers["x-ignored-fields"] == "options.\\x04caf\\xe9"
