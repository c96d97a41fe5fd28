"""Fast tests of POST /v1/rerank (and /rerank) against the scripted engine, whose score is the
share of the query's words a document holds: wire shape, order, top_n, return_documents, and
each refusal as an OpenAI error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from server.app import create_app
from server.engine.fake import FakeEngine
from server.registry import ModelSpec, Registry
from server.settings import Settings

pytestmark = pytest.mark.anyio
DOCUMENTS = ["a cat on a mat", "the capital of France is Paris", "Paris France capital city"]
QUERY = "capital of France"  # the fake scores: 0, 1, 2/3


@pytest.fixture
def app(tmp_path: Path) -> FastAPI:
    specs = {"fake-model": ModelSpec(id="fake-model", path="x.gguf"),
             "fake-embed": ModelSpec(id="fake-embed", path="x.gguf", embedding=True),
             "fake-rerank": ModelSpec(id="fake-rerank", path="x.gguf", embedding=True,
                                      pooling="rank")}
    registry = Registry(specs, "fake-model", tmp_path / "models.yaml", tmp_path, tmp_path)
    engine = FakeEngine(models=tuple(specs), embedding_models=("fake-embed", "fake-rerank"),
                        reranker_models=("fake-rerank",))
    return create_app(Settings(), engine=engine, registry=registry)


async def rerank(http: httpx.AsyncClient, path: str = "/v1/rerank",
                 **body: Any) -> httpx.Response:
    return await http.post(path, json={"model": "fake-rerank", "query": QUERY,
                                       "documents": DOCUMENTS, **body})


async def test_results_come_most_relevant_first_with_their_documents(
        http: httpx.AsyncClient) -> None:
    reply = await rerank(http)
    assert reply.status_code == 200
    body = reply.json()
    assert list(body) == ["id", "model", "results", "usage"]
    assert body["id"].startswith("rerank-") and body["model"] == "fake-rerank"
    assert [r["index"] for r in body["results"]] == [1, 2, 0]
    assert [r["relevance_score"] for r in body["results"]] == pytest.approx([1, 2 / 3, 0])
    assert [r["document"] for r in body["results"]] == [{"text": DOCUMENTS[i]} for i in (1, 2, 0)]
    # the fake vocabulary: BOS query EOS document EOS, a token per character
    tokens = sum(3 + len(QUERY) + len(d) for d in DOCUMENTS)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


@pytest.mark.parametrize("path", ["/rerank", "/v1/reranking", "/reranking"])
async def test_llama_server_paths_answer_the_same(http: httpx.AsyncClient, path: str) -> None:
    ours, theirs = (await rerank(http)).json(), (await rerank(http, path)).json()
    assert ours["results"] == theirs["results"]


async def test_top_n_and_return_documents(http: httpx.AsyncClient) -> None:
    top = (await rerank(http, top_n=2, return_documents=False)).json()["results"]
    assert [r["index"] for r in top] == [1, 2]
    assert all("document" not in r for r in top)
    for everything in (0, 10, None):
        results = (await rerank(http, top_n=everything)).json()["results"]
        assert [r["index"] for r in results] == [1, 2, 0]


async def test_documents_may_be_text_objects(http: httpx.AsyncClient) -> None:
    reply = await rerank(http, documents=[{"text": d} for d in DOCUMENTS])
    assert [r["index"] for r in reply.json()["results"]] == [1, 2, 0]
    assert reply.json()["results"][0]["document"] == {"text": DOCUMENTS[1]}


async def test_equal_scores_keep_document_order(http: httpx.AsyncClient) -> None:
    reply = await rerank(http, documents=["x", "y", "capital", "z"])
    assert [r["index"] for r in reply.json()["results"]] == [2, 0, 1, 3]


@pytest.mark.parametrize(("body", "param"), [
    ({"documents": []}, "documents"),
    ({"documents": "one document"}, "documents"),
    ({"documents": ["ok", 3]}, "documents"),
    ({"documents": [{"title": "no text"}]}, "documents"),
    ({"query": None}, "query"),
    ({"top_n": -1}, "top_n"),
    ({"top_n": "2"}, "top_n"),
    ({"return_documents": "yes"}, "return_documents"),
])
async def test_malformed_requests_are_400s_naming_the_field(
        http: httpx.AsyncClient, body: dict[str, Any], param: str) -> None:
    reply = await rerank(http, **body)
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == param


@pytest.mark.parametrize("model", ["fake-model", "fake-embed"])
async def test_a_model_that_is_not_a_reranker_is_a_400(http: httpx.AsyncClient,
                                                       model: str) -> None:
    reply = await rerank(http, model=model)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == "model" and "not a reranker" in error["message"]
    assert "pooling: rank" in error["message"]


async def test_an_unknown_model_is_a_404(http: httpx.AsyncClient) -> None:
    reply = await rerank(http, model="nope")
    assert reply.status_code == 404 and reply.json()["error"]["code"] == "model_not_found"


async def test_a_reranker_serves_neither_embeddings_nor_chat(http: httpx.AsyncClient) -> None:
    embeddings = await http.post("/v1/embeddings", json={"model": "fake-rerank", "input": "x"})
    assert embeddings.status_code == 400 and "is a reranker" in embeddings.json()["error"][
        "message"]
    chat = await http.post("/v1/chat/completions", json={
        "model": "fake-rerank", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400 and "/v1/rerank" in chat.json()["error"]["message"]


async def test_the_model_list_names_a_reranker_by_kind(http: httpx.AsyncClient) -> None:
    kinds = {m["id"]: m["kind"] for m in (await http.get("/v1/models")).json()["data"]}
    assert kinds == {"fake-model": "chat", "fake-embed": "embedding", "fake-rerank": "rerank"}
