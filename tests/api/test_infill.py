"""Fast tests of POST /infill against the scripted engine: the FIM prompt's layout (the fake
vocabulary is one token per character, its FIM tokens FAKE_INFILL), llama-server's reply and
stream, the sampling fields, and each refusal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from server.api.routes.infill import InfillParts, fim_prompt
from server.app import create_app
from server.engine.base import InfillTokens
from server.engine.fake import FAKE_INFILL, FakeEngine
from server.registry import ModelSpec, Registry
from server.settings import Settings

pytestmark = pytest.mark.anyio
BOS, PRE, SUF, MID, REP, SEP = 1, 3, 4, 5, 6, 7


def ids(text: str) -> list[int]:
    return [ord(c) for c in text]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(models=("coder", "chat", "embed"), embedding_models=("embed",),
                      infill_models=("coder",), n_ctx=256)


@pytest.fixture
def app(tmp_path: Path, engine: FakeEngine) -> FastAPI:
    specs = {"coder": ModelSpec(id="coder", path="x.gguf"),
             "chat": ModelSpec(id="chat", path="x.gguf"),
             "embed": ModelSpec(id="embed", path="x.gguf", embedding=True)}
    registry = Registry(specs, "coder", tmp_path / "models.yaml", tmp_path, tmp_path)
    return create_app(Settings(batch_tokens=64), engine=engine, registry=registry)


async def infill(http: httpx.AsyncClient, **body: Any) -> httpx.Response:
    return await http.post("/infill", json={"input_prefix": "def f(x):\n",
                                            "input_suffix": "\n    return y\n", **body})


async def test_the_prompt_is_the_repository_then_prefix_suffix_middle(
        http: httpx.AsyncClient, engine: FakeEngine) -> None:
    extra = [{"filename": "util.py", "text": "import os\n"}, {"text": "x = 1\n"}]
    reply = await infill(http, prompt="  y", input_suffix="\n  return y", input_extra=extra)
    assert reply.status_code == 200
    assert engine.requests[-1].prompt == tuple(
        [BOS, REP, *ids("myproject\n"),
         SEP, *ids("util.py\n"), *ids("import os\n"), SEP, *ids("tmp\n"), *ids("x = 1\n"),
         SEP, *ids("filename\n"),
         PRE, *ids("def f(x):\n"), *ids("  y"), SUF, *ids("\n  return y"), MID])
    assert reply.json()["truncated"] is False


async def test_local_context_fits_a_batch_and_old_repository_context_goes_first(
        http: httpx.AsyncClient, engine: FakeEngine) -> None:
    # batch_tokens 64: 48 prefix tokens (its end), 16 - 2 - len(prompt) suffix tokens (its
    # start); n_ctx 256: 256 - 64 - 2 * n_predict tokens of repository context (its end).
    prefix, suffix = "p" * 100 + "P" * 48, "S" * 12 + "s" * 100
    extra = [{"filename": "old.py", "text": "o" * 200}, {"filename": "new.py", "text": "n" * 20}]
    reply = await infill(http, input_prefix=prefix, input_suffix=suffix, prompt="ab",
                         input_extra=extra, n_predict=40)
    prompt = list(engine.requests[-1].prompt)
    repository = [REP, *ids("myproject\n"), SEP, *ids("old.py\n"), *ids("o" * 200),
                  SEP, *ids("new.py\n"), *ids("n" * 20), SEP, *ids("filename\n")]
    local = [PRE, *ids("P" * 48), *ids("ab"), SUF, *ids("S" * 12), MID]
    assert prompt == [BOS, *repository[-(256 - 64 - 80):], *local]
    assert reply.json()["truncated"] is True
    assert engine.requests[-1].max_tokens == 40


def test_without_file_separators_each_chunk_follows_a_snippet_line() -> None:
    fim = InfillTokens(prefix=PRE, suffix=SUF, middle=MID)  # no BOS, no REP/SEP
    parts = InfillParts(prefix=[10, 11], suffix=[12], prompt=[13], extra=[20, 21, 22])
    assert fim_prompt(fim, parts, n_batch=64, n_ctx=256, n_predict=0) == (
        (20, 21, 22, PRE, 10, 11, 13, SUF, 12, MID), False)
    assert fim_prompt(fim, parts, n_batch=64, n_ctx=66, n_predict=0) == (
        (21, 22, PRE, 10, 11, 13, SUF, 12, MID), True)


async def test_snippet_headers_in_the_prompt(http: httpx.AsyncClient, engine: FakeEngine,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("server.engine.fake.FAKE_INFILL",
                        InfillTokens(prefix=PRE, suffix=SUF, middle=MID))
    await infill(http, input_prefix="a", input_suffix="b", input_extra=[{"text": "c"}])
    assert engine.requests[-1].prompt == tuple(
        [*ids("\n\n--- snippet ---\n\n"), *ids("c"), PRE, *ids("a"), SUF, *ids("b"), MID])


async def test_the_reply_is_llama_servers(http: httpx.AsyncClient) -> None:
    body = (await infill(http)).json()
    assert body["content"] == "Hello, world!" and body["stop"] is True
    assert body["model"] == "coder" and body["stop_type"] == "eos"
    assert body["tokens_predicted"] == 4 and body["has_new_line"] is False
    assert set(body["timings"]) == {
        "cache_n", "prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second",
        "predicted_n", "predicted_ms", "predicted_per_token_ms", "predicted_per_second"}
    assert body["timings"]["predicted_n"] == 4


async def test_response_fields_pick_paths_as_llama_vim_asks(http: httpx.AsyncClient) -> None:
    body = (await infill(http, response_fields=["content", "timings/predicted_n",
                                                "timings/nope", "truncated"])).json()
    assert body == {"content": "Hello, world!", "timings/predicted_n": 4, "truncated": False}
    # llama.vim's warm-up request: read the repository context, return nothing
    warm = await infill(http, input_prefix="", input_suffix="", n_predict=0,
                        response_fields=[""], input_extra=[{"text": "x", "time": [1, 2]}])
    assert warm.status_code == 200 and warm.json() == {}


async def test_sampling_and_length_fields_reach_the_engine(http: httpx.AsyncClient,
                                                           engine: FakeEngine) -> None:
    body = (await infill(http, n_predict=2, temperature=0.0, top_k=40, top_p=0.9, seed=7,
                         stop=["\n\n"], n_indent=4, samplers=["top_k", "infill"],
                         cache_prompt=True, t_max_predict_ms=250)).json()
    assert body["content"] == "Hello," and body["stop_type"] == "limit"
    request = engine.requests[-1]
    assert request.max_tokens == 2 and request.stop == ("\n\n",)
    assert (request.sampling.temperature, request.sampling.top_k, request.sampling.top_p,
            request.sampling.seed) == (0.0, 40, 0.9, 7)
    await infill(http, n_predict=-1)
    assert engine.requests[-1].max_tokens is None
    await infill(http, max_tokens=3)
    assert engine.requests[-1].max_tokens == 3


async def test_fields_it_does_not_apply_are_named(http: httpx.AsyncClient) -> None:
    reply = await infill(http, n_indent=4, t_max_predict_ms=250)
    assert reply.status_code == 200
    assert reply.headers["x-ignored-fields"] == "n_indent, t_max_predict_ms"


async def test_a_stop_string_is_reported(http: httpx.AsyncClient) -> None:
    body = (await infill(http, stop=[" world"])).json()
    assert body["content"] == "Hello," and body["stop_type"] == "word"
    assert body["stopping_word"] == " world"


async def test_streamed_pieces_then_the_whole_reply(http: httpx.AsyncClient) -> None:
    reply = await infill(http, stream=True)
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line.removeprefix("data: "))
              for line in reply.text.split("\n\n") if line.startswith("data: ")]
    assert "[DONE]" not in reply.text  # llama-server's own stream has none
    assert [e["content"] for e in events[:-1]] == ["Hello", ",", " world", "!"]
    assert all(e["stop"] is False for e in events[:-1])
    assert events[-1]["stop"] is True and events[-1]["content"] == ""
    assert events[-1]["tokens_predicted"] == 4 and events[-1]["stop_type"] == "eos"


async def test_a_model_without_fim_tokens_is_a_400(http: httpx.AsyncClient) -> None:
    reply = await infill(http, model="chat")
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == "model" and "cannot fill in the middle" in error["message"]


async def test_other_refusals(http: httpx.AsyncClient) -> None:
    assert (await infill(http, model="embed")).status_code == 400
    assert (await infill(http, model="nope")).status_code == 404
    missing = await http.post("/infill", json={"input_prefix": "a"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "input_suffix"
    chunk = await infill(http, input_extra=[{"filename": "a.py"}])
    assert chunk.status_code == 400 and chunk.json()["error"]["param"].startswith("input_extra")
    assert (await infill(http, n_predict=-2)).status_code == 400
    assert (await infill(http, prompt=["not", "text"])).status_code == 400


def test_the_fake_infill_tokens_are_the_ones_these_tests_assume() -> None:
    assert InfillTokens(PRE, SUF, MID, REP, SEP, BOS) == FAKE_INFILL
