"""Ollama's API on the real llama.cpp engine, through the `ollama` Python client: list, show,
chat and generate (token counts checked against /tokenize), embeddings equal to /v1's, ps,
keep_alive 0 unloading, an unknown model, and a pull from a local stand-in of the Hub."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest

from tests.conftest import LiveServer
from tests.gguf_factory import write_gguf
from tests.hub_standin import Behaviour, HubStandIn

CHAT = "smollm2-135m-instruct"
EMBED = "smollm2-135m-embed"
GREEDY = {"temperature": 0, "num_predict": 8}


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[ollama.Client]:
    with ollama.Client(host=server.url) as client:
        yield client
    # the shared server goes on as the other modules expect it: the default model alone
    httpx.post(f"{server.url}/models/unload", json={"model": EMBED}, timeout=60)
    httpx.post(f"{server.url}/models/load", json={"model": CHAT}, timeout=60)


def token_count(server: LiveServer, **body: object) -> int:
    reply = httpx.post(f"{server.url}/tokenize", json={"model": CHAT, **body}, timeout=60)
    return int(reply.json()["count"])


def running(client: ollama.Client) -> set[str]:
    return {m.model or "" for m in client.ps().models}


def test_list_and_show_describe_the_gguf(client: ollama.Client) -> None:
    listed = {m.model: m for m in client.list().models}
    assert {CHAT, EMBED} <= set(listed)
    details = listed[CHAT].details
    assert details is not None and (details.family, details.quantization_level,
                                    details.parameter_size) == ("llama", "Q4_1", "135M")
    shown = client.show(CHAT)
    assert shown.capabilities == ["completion", "tools"]
    assert shown.modelinfo is not None and shown.modelinfo["llama.context_length"] == 8192
    assert "<|im_start|>" in (shown.template or "")
    assert client.show(EMBED).capabilities == ["embedding"]


def test_chat_streamed_and_whole(client: ollama.Client, server: LiveServer) -> None:
    messages = [{"role": "user", "content": "Name a colour."}]
    whole = client.chat(model=CHAT, messages=messages, options=GREEDY, stream=False)
    assert whole.message.content and whole.done_reason in ("stop", "length")
    assert 0 < (whole.eval_count or 0) <= 8
    assert whole.prompt_eval_count == token_count(server, messages=messages)
    assert (whole.total_duration or 0) >= (whole.eval_duration or 0) > 0
    parts = list(client.chat(model=CHAT, messages=messages, options=GREEDY, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content or "" for p in parts).strip()


def test_generate_templated_and_raw(client: ollama.Client, server: LiveServer) -> None:
    raw = client.generate(model=CHAT, prompt="The capital of France is", raw=True,
                          options=GREEDY)
    assert raw.response and raw.prompt_eval_count == token_count(
        server, prompt="The capital of France is")
    templated = client.generate(model=CHAT, prompt="The capital of France is", options=GREEDY)
    assert templated.response and templated.prompt_eval_count == token_count(
        server, messages=[{"role": "user", "content": "The capital of France is"}])


def test_embed_equals_the_openai_endpoint(client: ollama.Client, server: LiveServer) -> None:
    texts = ["The cat sat on the mat.", "Vectors for text."]
    ours = client.embed(model=EMBED, input=texts).embeddings
    theirs = httpx.post(f"{server.url}/v1/embeddings", json={"model": EMBED, "input": texts},
                        timeout=60).json()["data"]
    assert len(ours) == 2
    for mine, reference in zip(ours, theirs, strict=True):
        assert max(abs(a - b) for a, b in zip(mine, reference["embedding"], strict=True)) < 1e-6
    client.embed(model=EMBED, input=[], keep_alive=0)
    assert EMBED not in running(client)


def test_ps_then_keep_alive_0_unloads(client: ollama.Client) -> None:
    client.generate(model=CHAT, prompt="Hi", options=GREEDY)
    loaded = {m.model: m for m in client.ps().models}
    assert loaded[CHAT].context_length == 8192 and (loaded[CHAT].size or 0) > 0
    client.generate(model=CHAT, prompt="Hi", options=GREEDY, keep_alive=0)
    for model in running(client) - {CHAT}:
        client.generate(model=model, keep_alive=0)  # no prompt: unload now
    deadline = time.monotonic() + 10
    while running(client) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running(client) == set()


def test_an_unknown_model_is_a_404(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="no-such-model", messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.status_code == 404 and "no-such-model" in caught.value.error


def test_pull_downloads_with_progress(tmp_path: Path) -> None:
    content = write_gguf(tmp_path / "tiny.gguf", "llama").read_bytes()
    write_gguf(tmp_path / "local.gguf", "llama", seed=5)
    hub = HubStandIn({"someorg/tiny-GGUF/tiny.Q4_0.gguf": content}, Behaviour(chunk_delay=0.1))
    (tmp_path / "models.yaml").write_text(
        f"default: local\nmodels:\n  local:\n    path: {tmp_path / 'local.gguf'}\n"
        "  tiny:\n    repo: someorg/tiny-GGUF\n    file: tiny.Q4_0.gguf\n    n_ctx: 128\n")
    live = LiveServer(["--models-file", str(tmp_path / "models.yaml")],
                      env={"HF_ENDPOINT": hub.url, "GGSERVE_MODELS_DIR": str(tmp_path / "m")})
    try:
        with ollama.Client(host=live.url) as client:
            check_pull(client, tmp_path, content)
    finally:
        live.stop()
        hub.close()


def check_pull(client: ollama.Client, tmp_path: Path, content: bytes) -> None:
    assert "tiny" not in {m.model for m in client.list().models}
    steps = list(client.pull("tiny", stream=True))
    assert steps[0].status == "pulling manifest" and steps[-1].status == "success"
    progress = [s for s in steps if s.total]
    assert progress and progress[-1].completed == progress[-1].total == len(content)
    assert (progress[0].completed or 0) < len(content)  # reported while it downloads
    assert (tmp_path / "m" / "someorg--tiny-GGUF" / "tiny.Q4_0.gguf").read_bytes() == content
    assert "tiny" in {m.model for m in client.list().models}
    with pytest.raises(ollama.ResponseError) as caught:
        client.pull("nope")
    assert caught.value.status_code == 404
