"""POST /v1/rerank on the real llama.cpp, with a tiny BERT cross-encoder whose weights are chosen
so that its score is predictable: attention is uniform (Q = K = 0, V = O = I), the feed-forward
adds nothing, and only the marker word "gold" has a non-zero first embedding dimension, which
the classification head reads. So a document with more "gold" scores higher, and the exact
score follows from a few lines of numpy over the pair's tokens ([CLS] query [SEP][SEP] document
[SEP]): a wrong pair layout, pooling or head gives other numbers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from llama_cpp import Llama

from server.engine.llama.native import NativeModel, init_backend
from server.engine.llama.rerank import pair_tokens
from tests.conftest import LiveServer
from tests.gguf_factory import NORM_EPS, Shape, vocabulary, write_gguf

SHAPE = Shape(n_layer=1, n_embd=64, n_head=4, n_head_kv=4, n_ff=128, n_ctx_train=512)
MARKER = "▁gold"
QUERY = "where is the gold"
DOCUMENTS = ["the sun is here", "the gold is here", "the gold and gold", "a dog and a cat"]
HEAD_SCALE, HEAD_BIAS = 0.5, 0.25  # score = tanh(0.5 * h[0]) + 0.25


def chosen_weights(seed: int = 3) -> dict[str, np.ndarray]:
    """The tensors that make the score predictable (the rest stay random)."""
    rng = np.random.default_rng(seed)
    tokens = vocabulary()[0]
    e = SHAPE.n_embd
    embd = rng.standard_normal((len(tokens), e)).astype(np.float32) * 0.5
    embd[:, 0] = 0.0
    embd[tokens.index(MARKER), 0] = 4.0
    pos = rng.standard_normal((SHAPE.n_ctx_train, e)).astype(np.float32) * 0.5
    pos[:, 0] = 0.0
    eye, zeros = np.eye(e, dtype=np.float32), np.zeros((e, e), dtype=np.float32)
    head = np.zeros((1, e), dtype=np.float32)
    head[0, 0] = 1.0
    return {"token_embd.weight": embd, "position_embd.weight": pos,
            "token_types.weight": np.zeros((2, e), dtype=np.float32),
            "blk.0.attn_q.weight": zeros, "blk.0.attn_k.weight": zeros,
            "blk.0.attn_v.weight": eye, "blk.0.attn_output.weight": eye,
            "blk.0.ffn_down.weight": np.zeros((e, SHAPE.n_ff), dtype=np.float32),
            "cls.weight": eye * HEAD_SCALE, "cls.output.weight": head,
            "cls.output.bias": np.array([HEAD_BIAS], dtype=np.float32)}


def expected_score(weights: dict[str, np.ndarray], tokens: list[int]) -> float:
    """What the chosen model computes for one pair, in float64."""
    def norm(x: np.ndarray) -> np.ndarray:
        centred = x - x.mean(-1, keepdims=True)
        return centred / np.sqrt((centred**2).mean(-1, keepdims=True) + NORM_EPS)

    x = norm(weights["token_embd.weight"][tokens].astype(np.float64)
             + weights["position_embd.weight"][:len(tokens)])
    h = norm(norm(x + x.mean(0)))  # uniform attention, V = O = I; then a feed-forward of 0
    return float(np.tanh(HEAD_SCALE * h[0, 0]) + HEAD_BIAS)  # the [CLS] token's first dim


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("rerank-ggufs")
    return {
        "reranker": write_gguf(d / "reranker.gguf", "bert", shape=SHAPE, reranker=True,
                               tensors=chosen_weights()),
        "templated": write_gguf(d / "templated.gguf", "bert", shape=SHAPE, reranker=True,
                                chat_template=[{"name": "rerank", "template":
                                                "<s>query: {query}</s>doc: {document}</s>"}]),
        "embedder": write_gguf(d / "embedder.gguf", "bert", seed=7),
        "chat": write_gguf(d / "chat.gguf", "llama", seed=8)}


@pytest.fixture(scope="module")
def live(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    registry = tmp_path_factory.mktemp("rerank-registry") / "models.yaml"
    registry.write_text(f"""
models:
  chat:
    path: {files["chat"]}
    n_ctx: 256
  reranker:
    path: {files["reranker"]}
    embedding: true
    pooling: rank
    n_ctx: 256
  reranker-by-its-gguf:    # no pooling named: the GGUF's own (rank)
    path: {files["reranker"]}
    embedding: true
    n_ctx: 256
  embedder:
    path: {files["embedder"]}
    embedding: true
    n_ctx: 256
""")
    server = LiveServer(["--models-file", str(registry)])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tokenizer(files: dict[str, Path]) -> Iterator[Llama]:
    llm = Llama(str(files["reranker"]), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def rerank(live: LiveServer, **body: Any) -> httpx.Response:
    return httpx.post(f"{live.url}/v1/rerank", json={
        "model": "reranker", "query": QUERY, "documents": DOCUMENTS, **body}, timeout=60)


def pair(llm: Llama, query: str, document: str) -> list[int]:
    """llama-server's pair for a BERT vocabulary: [CLS] query [SEP] [SEP] document [SEP]."""
    def text(t: str) -> list[int]:
        return llm.tokenize(t.encode(), add_bos=False, special=False)

    return [1, *text(query), 2, 2, *text(document), 2]


def test_documents_with_the_marker_come_first_with_the_scores_the_weights_give(
        live: LiveServer, tokenizer: Llama) -> None:
    reply = rerank(live)
    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    assert [r["index"] for r in results[:2]] == [2, 1]  # "gold" twice, then once
    weights = chosen_weights()
    pairs = [pair(tokenizer, QUERY, d) for d in DOCUMENTS]
    for result in results:
        want = expected_score(weights, pairs[result["index"]])
        assert result["relevance_score"] == pytest.approx(want, abs=1e-4)
        assert result["document"] == {"text": DOCUMENTS[result["index"]]}
    assert len({round(r["relevance_score"], 6) for r in results}) == len(DOCUMENTS)
    tokens = sum(len(p) for p in pairs)
    assert reply.json()["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_top_n_return_documents_and_the_gguf_declared_pooling(live: LiveServer) -> None:
    everything = rerank(live).json()["results"]
    top = rerank(live, top_n=2, return_documents=False).json()["results"]
    assert top == [{k: v for k, v in r.items() if k != "document"} for r in everything[:2]]
    by_gguf = rerank(live, model="reranker-by-its-gguf").json()["results"]
    assert [(r["index"], r["relevance_score"]) for r in by_gguf] == \
        [(r["index"], r["relevance_score"]) for r in everything]
    alias = httpx.post(f"{live.url}/rerank", json={"model": "reranker", "query": QUERY,
                                                  "documents": DOCUMENTS}, timeout=60)
    assert alias.json()["results"] == everything


def test_refusals(live: LiveServer) -> None:
    for model in ("chat", "embedder"):
        reply = rerank(live, model=model)
        assert reply.status_code == 400, reply.text
        assert "not a reranker" in reply.json()["error"]["message"]
    too_long = rerank(live, documents=["short", "the " * 300])
    assert too_long.status_code == 400
    error = too_long.json()["error"]
    assert error["code"] == "context_length_exceeded" and "Document 1" in error["message"]
    embed = httpx.post(f"{live.url}/v1/embeddings", json={"model": "reranker", "input": "x"},
                       timeout=60)
    assert embed.status_code == 400 and "is a reranker" in embed.json()["error"]["message"]
    kinds = {m["id"]: m["kind"] for m in httpx.get(f"{live.url}/v1/models").json()["data"]}
    assert kinds["reranker"] == "rerank" and kinds["embedder"] == "embedding"


def test_a_rerank_template_fills_in_the_client_text_unparsed(files: dict[str, Path]) -> None:
    init_backend()
    model = NativeModel(files["templated"], n_gpu_layers=0, repack=False)
    try:
        def text(t: str) -> list[int]:
            return model.tokenize(t, parse_special=False)

        tokens = pair_tokens(model, "a </s> b", "the gold")
        # the template's <s> and </s> are tokens; the query's "</s>" is text
        assert tokens == [1, *text("query: a </s> b"), 2, *text("doc: the gold"), 2]
        assert tokens.count(2) == 2
    finally:
        model.close()
