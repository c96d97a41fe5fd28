"""Fast tests of /tokenizer_info, /tokenize and /detokenize against the scripted engine, whose
vocabulary is one token per character (BOS `<s>` = 1)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from server.app import create_app
from server.engine.fake import CHATML, FakeEngine
from server.registry import ModelSpec, Registry
from server.settings import Settings

pytestmark = pytest.mark.anyio


def make_app(tmp_path: Path, **settings: Any) -> FastAPI:
    specs = {name: ModelSpec(id=name, path="x.gguf") for name in ("fake-model", "other")}
    registry = Registry(specs, "fake-model", tmp_path / "models.yaml", tmp_path, tmp_path)
    return create_app(Settings(**settings), engine=FakeEngine(models=tuple(specs), n_ctx=64),
                      registry=registry)


@pytest.fixture
async def http(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(tmp_path)),
                                 base_url="http://test") as client:
        yield client


async def test_tokenizer_info_of_the_default_model(http: httpx.AsyncClient) -> None:
    info = (await http.get("/tokenizer_info")).json()
    assert info == {"model": "fake-model", "tokenizer_class": "llama.cpp", "vocab_type": "fake",
                    "bos_token": "<s>", "eos_token": "</s>", "pad_token": None,
                    "unk_token": None, "chat_template": CHATML, "model_max_length": 64,
                    "add_bos_token": True}
    other = (await http.get("/tokenizer_info", params={"model": "other"})).json()
    assert other["model"] == "other"


async def test_tokenize_a_prompt(http: httpx.AsyncClient) -> None:
    plain = (await http.post("/tokenize", json={"prompt": "hi"})).json()
    assert plain == {"count": 3, "max_model_len": 64, "tokens": [1, 104, 105],
                     "token_strs": None}
    bare = (await http.post("/tokenize", json={"prompt": "hi", "add_special_tokens": False,
                                               "return_token_strs": True})).json()
    assert bare["tokens"] == [104, 105] and bare["token_strs"] == ["h", "i"]


async def test_tokenize_messages_renders_the_chat_template(http: httpx.AsyncClient) -> None:
    messages = [{"role": "user", "content": "hi"}]
    reply = (await http.post("/tokenize", json={"messages": messages})).json()
    text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert reply["tokens"] == [1, *map(ord, text)]
    no_prompt = (await http.post("/tokenize", json={"messages": messages,
                                                    "add_generation_prompt": False})).json()
    assert no_prompt["count"] == reply["count"] - len("<|im_start|>assistant\n")


async def test_detokenize(http: httpx.AsyncClient) -> None:
    reply = await http.post("/detokenize", json={"tokens": [1, 104, 105, 2]})
    assert reply.json() == {"prompt": "<s>hi</s>"}
    assert (await http.post("/detokenize", json={"tokens": []})).json() == {"prompt": ""}


@pytest.mark.parametrize(("path", "body", "param", "words"), [
    ("/tokenize", {}, None, "either 'prompt'"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, None,
     "either 'prompt'"),
    ("/tokenize", {"prompt": 5}, "prompt", ""),
    ("/detokenize", {"tokens": [104, 1_114_112]}, "tokens", "Token id 1114112"),
    ("/detokenize", {"tokens": [-1]}, "tokens", "Token id -1"),
    ("/detokenize", {"tokens": "hi"}, "tokens", ""),
])
async def test_refusals_are_openai_400s(http: httpx.AsyncClient, path: str,
                                        body: dict[str, Any], param: str | None,
                                        words: str) -> None:
    reply = await http.post(path, json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"]


async def test_unknown_model_is_404(http: httpx.AsyncClient) -> None:
    for reply in [await http.get("/tokenizer_info", params={"model": "gpt-4"}),
                  await http.post("/tokenize", json={"model": "gpt-4", "prompt": "a"}),
                  await http.post("/detokenize", json={"model": "gpt-4", "tokens": [1]})]:
        assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found"


async def test_tokenizer_endpoints_are_behind_the_api_key(tmp_path: Path) -> None:
    app = make_app(tmp_path, api_keys=["k"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as http:
        key = {"Authorization": "Bearer k"}
        for method, path, body in [("GET", "/tokenizer_info", None),
                                   ("POST", "/tokenize", {"prompt": "a"}),
                                   ("POST", "/detokenize", {"tokens": [97]})]:
            assert (await http.request(method, path, json=body)).status_code == 401, path
            ok = await http.request(method, path, json=body, headers=key)
            assert ok.status_code == 200, path


@pytest.mark.parametrize("field", ["return_token_strs", "add_special_tokens",
                                   "add_generation_prompt"])
async def test_tokenize_booleans_are_strict(http: httpx.AsyncClient, field: str) -> None:
    response = await http.post("/tokenize", json={"prompt": "hi", field: 0})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == field
