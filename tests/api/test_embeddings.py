"""Fast tests of POST /v1/embeddings against the scripted engine: wire shape, encodings, and
every refusal as an OpenAI error."""

from __future__ import annotations

import base64
import math
import struct
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from server.app import create_app
from server.engine.fake import FakeEngine
from server.registry import ModelSpec, Registry
from server.settings import Settings

pytestmark = pytest.mark.anyio
URL = "/v1/embeddings"


@pytest.fixture
def app(tmp_path: Path) -> FastAPI:
    specs = {"fake-model": ModelSpec(id="fake-model", path="x.gguf"),
             "fake-embed": ModelSpec(id="fake-embed", path="x.gguf", embedding=True)}
    registry = Registry(specs, "fake-model", tmp_path / "models.yaml", tmp_path, tmp_path)
    engine = FakeEngine(models=tuple(specs), embedding_models=("fake-embed",), n_ctx=64)
    return create_app(Settings(), engine=engine, registry=registry)




async def embed(http: httpx.AsyncClient, **body: Any) -> httpx.Response:
    return await http.post(URL, json={"model": "fake-embed", **body})


async def test_string_input_gives_one_unit_vector_and_usage(http: httpx.AsyncClient) -> None:
    reply = await embed(http, input="hello")
    assert reply.status_code == 200
    body = reply.json()
    assert list(body) == ["object", "data", "model", "usage"]
    assert body["object"] == "list" and body["model"] == "fake-embed"
    [item] = body["data"]
    assert item["object"] == "embedding" and item["index"] == 0
    assert math.isclose(math.hypot(*item["embedding"]), 1.0, rel_tol=1e-9)
    # the fake vocabulary: BOS, then one token per character
    assert body["usage"] == {"prompt_tokens": 6, "total_tokens": 6}


async def test_list_and_token_inputs(http: httpx.AsyncClient) -> None:
    texts = (await embed(http, input=["ab", "cd", "ab"])).json()
    assert [d["index"] for d in texts["data"]] == [0, 1, 2]
    vectors = [d["embedding"] for d in texts["data"]]
    assert vectors[0] == vectors[2] != vectors[1]
    assert texts["usage"]["prompt_tokens"] == 9
    # token ids are used as they are: the text "ab" is BOS, 'a', 'b'
    one = (await embed(http, input=[1, ord("a"), ord("b")])).json()
    assert one["data"][0]["embedding"] == vectors[0]
    assert one["usage"]["prompt_tokens"] == 3
    many = (await embed(http, input=[[1, ord("c"), ord("d")], [5]])).json()
    assert many["data"][0]["embedding"] == vectors[1] and len(many["data"]) == 2


async def test_base64_is_the_float32_bytes_of_the_floats(http: httpx.AsyncClient) -> None:
    floats = (await embed(http, input="hello", encoding_format="float")).json()
    packed = (await embed(http, input="hello", encoding_format="base64")).json()
    raw = base64.b64decode(packed["data"][0]["embedding"])
    expected = floats["data"][0]["embedding"]
    assert list(struct.unpack(f"<{len(expected)}f", raw)) == \
        [struct.unpack("<f", struct.pack("<f", v))[0] for v in expected]


async def test_openai_sdk_reads_its_default_base64(app: FastAPI) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test/v1") as http:
        client = openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused",
                                    http_client=http, max_retries=0)
        reply = await client.embeddings.create(model="fake-embed", input=["hi", "there"])
    assert [len(d.embedding) for d in reply.data] == [8, 8]
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == 9


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"input": ""}, "input", "Input 0 is empty"),
    ({"input": []}, "input", "'input' is empty"),
    ({"input": ["ok", ""]}, "input", "Input 1 is empty"),
    ({"input": [[1, 2], []]}, "input", "Input 1 is empty"),
    ({"input": ["x"] * 2049}, "input", "at most 2048"),
    ({"input": "x" * 80}, "input", "Input 0 has 81 tokens; this model embeds at most 64"),
    ({"input": [[1, -5]]}, "input", "Token id -5 is not in this model's vocabulary"),
    ({"input": "hi", "dimensions": 8}, "dimensions", "'dimensions' is not supported"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
    ({"input": [1, "a"]}, "input", "expected a string, a list of strings"),
    ({"input": [True]}, "input", "expected a string"),
    ({"input": "hi", "model": "fake-model"}, "model", "mark its entry `embedding: true`"),
])
async def test_refusals_are_openai_400s(http: httpx.AsyncClient, body: dict[str, Any],
                                        param: str, words: str) -> None:
    reply = await embed(http, **body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"]


async def test_too_long_input_is_context_length_exceeded(http: httpx.AsyncClient) -> None:
    error = (await embed(http, input=["ok", "y" * 100])).json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["message"].startswith("Input 1 has 101 tokens")


async def test_unknown_model_is_404(http: httpx.AsyncClient) -> None:
    reply = await embed(http, input="hi", model="text-embedding-3-small")
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found"


async def test_an_embedding_model_refuses_to_generate(http: httpx.AsyncClient) -> None:
    for path, body in [("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/completions", {"prompt": "hi"})]:
        reply = await http.post(path, json={"model": "fake-embed", **body})
        assert reply.status_code == 400, path
        assert "is an embedding model" in reply.json()["error"]["message"]


async def test_a_slow_request_times_out_with_a_504(tmp_path: Path) -> None:
    registry = Registry({"e": ModelSpec(id="e", path="x.gguf", embedding=True)}, "e",
                        tmp_path / "m.yaml", tmp_path, tmp_path)
    app = create_app(Settings(request_timeout_s=0.05), registry=registry,
                     engine=FakeEngine(models=("e",), embedding_models=("e",), delay=5))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as http:
        reply = await http.post(URL, json={"model": "e", "input": "hi"})
    assert reply.status_code == 504 and reply.json()["error"]["code"] == "request_timeout"


async def test_embeddings_are_behind_the_api_key(tmp_path: Path) -> None:
    registry = Registry({"e": ModelSpec(id="e", path="x.gguf", embedding=True)}, "e",
                        tmp_path / "m.yaml", tmp_path, tmp_path)
    app = create_app(Settings(api_keys=["k"]), registry=registry,
                     engine=FakeEngine(models=("e",), embedding_models=("e",)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as http:
        body = {"model": "e", "input": "hi"}
        assert (await http.post(URL, json=body)).status_code == 401
        ok = await http.post(URL, json=body, headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200
