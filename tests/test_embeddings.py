"""POST /v1/embeddings on the real llama.cpp, through the `openai` SDK: SmolLM2's file as the
registry's `smollm2-135m-embed`, and tiny GGUFs of three more architectures (a BERT encoder
among them), each equal to what llama-cpp-python's own Llama.embed computes for the same file."""

from __future__ import annotations

import asyncio
import base64
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import llama_cpp
import openai
import pytest
from llama_cpp import Llama

from server.engine.base import Embeddings
from server.engine.llama.context import ContextConfig
from server.engine.llama.embedder import Embedder
from server.engine.llama.native import NativeModel, init_backend
from server.metrics import Metrics
from tests.conftest import LiveServer, reference_llama
from tests.gguf_factory import write_gguf

MODEL = "smollm2-135m-embed"
TEXTS = ["The cat sat on the mat.", "Embeddings map text to vectors.",
         "A completely different sentence about rivers and mountains."]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    # the shared server goes on as the other modules expect it: the default model alone
    httpx.post(f"{server.url}/models/unload", json={"model": MODEL}, timeout=60)


def reference(path: Path, pooling: int, n_ctx: int) -> Llama:
    """llama-cpp-python's own embedding model for `path`, with the server's weight layout."""
    return reference_llama(path, embedding=True, pooling_type=pooling, n_ctx=n_ctx)



@pytest.fixture(scope="module")
def smollm2_embedder(smollm2_path: Path) -> Iterator[Llama]:
    llm = reference(smollm2_path, llama_cpp.LLAMA_POOLING_TYPE_MEAN, 512)
    yield llm
    llm.close()


def floats(client: openai.OpenAI, inputs: Any, model: str = MODEL) -> list[list[float]]:
    reply = client.embeddings.create(model=model, input=inputs, encoding_format="float")
    return [item.embedding for item in reply.data]


def assert_close(ours: list[list[float]], theirs: list[list[float]]) -> None:
    assert len(ours) == len(theirs)
    for mine, ref in zip(ours, theirs, strict=True):
        assert len(mine) == len(ref)
        assert max(abs(a - b) for a, b in zip(mine, ref, strict=True)) < TOLERANCE


def test_a_string_equals_llama_cpp_python_and_is_unit_length(
        client: openai.OpenAI, smollm2_embedder: Llama) -> None:
    for text in TEXTS:
        [vector] = floats(client, text)
        assert len(vector) == 576  # SmolLM2-135M's hidden size
        assert math.isclose(math.hypot(*vector), 1.0, rel_tol=1e-6)
        assert_close([vector], [smollm2_embedder.embed(text, normalize=True)])


def test_a_list_is_one_decode_call_and_equals_llama_cpp_python(
        client: openai.OpenAI, server: LiveServer, smollm2_embedder: Llama) -> None:
    floats(client, "warm-up")  # the model is loaded
    calls = server.metric("ggserve:decode_calls_total", model=MODEL)
    vectors = floats(client, TEXTS)
    assert server.metric("ggserve:decode_calls_total", model=MODEL) == calls + 1
    # Llama.embed packs a list into one batch as well; its rows round alike.
    assert_close(vectors, smollm2_embedder.embed(TEXTS, normalize=True))  # type: ignore[arg-type]


def test_identical_texts_give_identical_vectors(client: openai.OpenAI) -> None:
    first, again = floats(client, TEXTS[0]), floats(client, TEXTS[0])
    assert first == again
    # In one batch the same text lands on other rows of llama.cpp's kernels, which round
    # differently (~1e-3 on this quantized decoder); the direction stays the same.
    twice = floats(client, [TEXTS[0], TEXTS[1], TEXTS[0]])
    assert sum(a * b for a, b in zip(twice[0], twice[2], strict=True)) > 0.9999


def test_token_ids_are_used_as_they_are(client: openai.OpenAI,
                                        smollm2_embedder: Llama) -> None:
    tokens = smollm2_embedder.tokenize(TEXTS[1].encode(), add_bos=True, special=True)
    by_text = floats(client, TEXTS[1])
    assert_close(floats(client, tokens), by_text)
    assert_close(floats(client, [tokens]), by_text)


def test_usage_counts_every_input_token(client: openai.OpenAI,
                                        smollm2_embedder: Llama) -> None:
    reply = client.embeddings.create(model=MODEL, input=TEXTS)
    expected = sum(len(smollm2_embedder.tokenize(t.encode(), add_bos=True, special=True))
                   for t in TEXTS)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == expected
    assert reply.model == MODEL and [d.index for d in reply.data] == [0, 1, 2]


def test_base64_equals_float(client: openai.OpenAI, server: LiveServer) -> None:
    def post(fmt: str) -> list[Any]:
        body = {"model": MODEL, "input": TEXTS, "encoding_format": fmt}
        return [d["embedding"] for d in
                httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=60).json()["data"]]

    for packed, plain in zip(post("base64"), post("float"), strict=True):
        raw = base64.b64decode(packed)
        assert list(struct.unpack(f"<{len(plain)}f", raw)) == \
            [struct.unpack("<f", struct.pack("<f", v))[0] for v in plain]


def test_refusals(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as long:
        client.embeddings.create(model=MODEL, input=["short", "word " * 600])
    assert long.value.body["code"] == "context_length_exceeded"
    assert "Input 1 has 60" in long.value.body["message"]
    assert "at most 512 tokens" in long.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="embedding: true"):
        client.embeddings.create(model="smollm2-135m-instruct", input="hi")
    with pytest.raises(openai.BadRequestError, match="is an embedding model"):
        client.chat.completions.create(model=MODEL,
                                       messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model=MODEL, input="hi", dimensions=64)
    with pytest.raises(openai.BadRequestError, match="not in this model's vocabulary"):
        client.embeddings.create(model=MODEL, input=[[1, 10**6]])


# ---- more architectures, from tiny GGUFs the tests write -----------------------------------


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("embed-ggufs")
    return {"stablelm": write_gguf(d / "stablelm.gguf", "stablelm", seed=5),
            "falcon": write_gguf(d / "falcon.gguf", "falcon", add_bos=False, seed=6),
            "bert": write_gguf(d / "bert.gguf", "bert", seed=7)}


@pytest.fixture(scope="module")
def tiny_server(tiny_files: dict[str, Path],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    registry = tmp_path_factory.mktemp("embed-registry") / "models.yaml"
    registry.write_text(f"""
models:
  tiny-stablelm-embed:   # no pooling in the GGUF: mean
    path: {tiny_files["stablelm"]}
    embedding: true
    n_ctx: 256
  tiny-falcon-embed:
    path: {tiny_files["falcon"]}
    embedding: true
    pooling: last
    n_ctx: 256
  tiny-bert-embed:       # an encoder without a KV cache; CLS pooling from its GGUF
    path: {tiny_files["bert"]}
    embedding: true
    n_ctx: 256
""")
    live = LiveServer(["--models-file", str(registry)])
    yield live
    live.stop()


@pytest.mark.parametrize(("model", "file", "pooling"), [
    ("tiny-stablelm-embed", "stablelm", llama_cpp.LLAMA_POOLING_TYPE_MEAN),
    ("tiny-falcon-embed", "falcon", llama_cpp.LLAMA_POOLING_TYPE_LAST),
    ("tiny-bert-embed", "bert", llama_cpp.LLAMA_POOLING_TYPE_CLS)])
def test_other_architectures_equal_llama_cpp_python(
        tiny_server: LiveServer, tiny_files: dict[str, Path], model: str, file: str,
        pooling: int) -> None:
    client = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0)
    llm = reference(tiny_files[file], pooling, 256)
    try:
        texts = ["hello world", "the model answers the user"]
        assert_close(floats(client, texts[0], model), [llm.embed(texts[0], normalize=True)])
        assert_close(floats(client, texts, model),
                     llm.embed(texts, normalize=True))  # type: ignore[arg-type]
        usage = client.embeddings.create(model=model, input=texts).usage
        assert usage.prompt_tokens == sum(len(llm.tokenize(t.encode())) for t in texts)
    finally:
        llm.close()


def test_a_request_given_up_stops_at_its_next_decode_call(tiny_files: dict[str, Path]) -> None:
    init_backend()
    metrics = Metrics()
    config = ContextConfig(n_ctx=16, parallel=1, batch_tokens=16, threads=2, rope={})
    embedder = Embedder(NativeModel(tiny_files["stablelm"], n_gpu_layers=0, repack=False),
                        config, None, "tiny", metrics)

    async def give_up_then_embed() -> Embeddings:
        work = asyncio.ensure_future(embedder.embed([[5] * 16] * 500))  # 500 decode calls
        await asyncio.sleep(0.01)
        work.cancel()  # as a timeout or a shutdown does
        with pytest.raises(asyncio.CancelledError):
            await work
        return await embedder.embed(["hello world"])

    try:
        result = asyncio.run(give_up_then_embed())
        calls = metrics.registry.get_sample_value("ggserve:decode_calls_total", {"model": "tiny"})
        assert calls is not None and calls < 400 and embedder.waiting == 0  # of 500 + 1
        assert len(result.vectors) == 1 and embedder.pooling == "mean"
    finally:
        embedder.close()
        embedder.model.close()
