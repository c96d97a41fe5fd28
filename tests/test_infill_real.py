"""POST /infill on the real llama.cpp, with tiny code models whose vocabularies carry FIM tokens
that llama.cpp finds by their text: Qwen2.5-Coder's (byte-level BPE, with <|fim_repo|> and
<|file_sep|> for repository context) and StarCoder's (SentencePiece with a BOS, no file
separator: each chunk after a snippet line). The prompt the engine is handed is checked token
by token against llama-cpp-python's own tokenizer; a model without FIM tokens gets a 400."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from llama_cpp import Llama

from server.app import create_app
from server.engine.base import GenerationRequest, GenerationStream
from server.settings import Settings
from tests.gguf_factory import write_gguf

QWEN_FIM = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>",
            "<|fim_repo|>", "<|file_sep|>"]
STARCODER_FIM = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"]
BODY = {"input_prefix": "def add(a, b):\n", "input_suffix": "\n\nprint(add(1, 2))\n",
        "prompt": "    return", "input_extra": [{"filename": "util.py", "text": "import os\n"}],
        "n_predict": 8, "temperature": 0.0}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("infill-ggufs")
    return {"qwen": write_gguf(d / "qwen.gguf", "llama", tokenizer="gpt2", add_bos=False,
                               special_tokens=QWEN_FIM, seed=11),
            "starcoder": write_gguf(d / "starcoder.gguf", "llama", special_tokens=STARCODER_FIM,
                                    seed=12),
            "plain": write_gguf(d / "plain.gguf", "llama", seed=13)}


@pytest.fixture(scope="module")
def settings(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Settings:
    registry = tmp_path_factory.mktemp("infill-registry") / "models.yaml"
    registry.write_text("models:\n" + "".join(
        f"  {name}:\n    path: {path}\n    n_ctx: 1024\n" for name, path in files.items()))
    return Settings(models_file=registry, parallel=1, batch_tokens=256)


@pytest.fixture(scope="module")
def vocabs(files: dict[str, Path]) -> Iterator[dict[str, Llama]]:
    loaded = {name: Llama(str(path), vocab_only=True, verbose=False)
              for name, path in files.items()}
    yield loaded
    for llm in loaded.values():
        llm.close()


def serve(settings: Settings, *bodies: dict[str, Any]) -> list[tuple[httpx.Response, Any]]:
    """POST each body to /infill on an app with the real engine; each reply, with the prompt
    the engine was handed (None when no generation started)."""
    async def run() -> list[tuple[httpx.Response, Any]]:
        app = create_app(settings)
        engine = app.state.engine
        handed: list[GenerationRequest] = []
        generate = engine.generate

        async def recording(request: GenerationRequest) -> GenerationStream:
            handed.append(request)
            return await generate(request)  # type: ignore[no-any-return]

        engine.generate = recording
        await engine.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://test", timeout=60) as http:
                replies = []
                for body in bodies:
                    before = len(handed)
                    reply = await http.post("/infill", json=body)
                    replies.append((reply, handed[-1].prompt if len(handed) > before else None))
                return replies
        finally:
            await engine.stop()

    return asyncio.run(run())


def text(llm: Llama, value: str) -> list[int]:
    return llm.tokenize(value.encode(), add_bos=False, special=False)


def special(llm: Llama, value: str) -> int:
    [token] = llm.tokenize(value.encode(), add_bos=False, special=True)
    return token


def test_qwen_layout_repository_then_prefix_suffix_middle(settings: Settings,
                                                          vocabs: dict[str, Llama]) -> None:
    [(reply, prompt)] = serve(settings, {**BODY, "model": "qwen"})
    assert reply.status_code == 200, reply.text
    llm = vocabs["qwen"]
    pre, suf, mid, _, rep, sep = (special(llm, t) for t in QWEN_FIM)
    assert prompt == (
        rep, *text(llm, "myproject\n"), sep, *text(llm, "util.py\n"), *text(llm, "import os\n"),
        sep, *text(llm, "filename\n"),
        pre, *text(llm, BODY["input_prefix"]), *text(llm, BODY["prompt"]),
        suf, *text(llm, BODY["input_suffix"]), mid)
    body = reply.json()
    assert body["model"] == "qwen" and body["stop"] is True and body["truncated"] is False
    assert body["tokens_evaluated"] == len(prompt) and 0 < body["tokens_predicted"] <= 8
    assert body["stop_type"] in ("eos", "limit") and isinstance(body["content"], str)
    assert body["timings"]["predicted_n"] == body["tokens_predicted"]


def test_starcoder_layout_has_a_bos_and_snippet_lines(settings: Settings,
                                                      vocabs: dict[str, Llama]) -> None:
    client_text = "x = '<fim_middle>'\n"  # FIM token text in the client's code stays text
    [(reply, prompt)] = serve(settings, {**BODY, "model": "starcoder", "input_prefix":
                                         client_text})
    assert reply.status_code == 200, reply.text
    llm = vocabs["starcoder"]
    pre, suf, mid = (special(llm, t) for t in STARCODER_FIM)
    assert prompt == (
        1, *text(llm, "\n\n--- snippet ---\n\n"), *text(llm, "import os\n"),
        pre, *text(llm, client_text), *text(llm, BODY["prompt"]),
        suf, *text(llm, BODY["input_suffix"]), mid)
    assert prompt.count(mid) == 1


def test_long_context_is_cut_as_llama_server_cuts_it(settings: Settings,
                                                     vocabs: dict[str, Llama]) -> None:
    prefix = "".join(f"line{i} = {i}\n" for i in range(200))
    extra = [{"filename": f"f{i}.py", "text": "value = 1\n" * 40} for i in range(20)]
    [(reply, prompt)] = serve(settings, {**BODY, "model": "qwen", "input_prefix": prefix,
                                         "input_extra": extra, "n_predict": 16})
    assert reply.status_code == 200, reply.text
    assert reply.json()["truncated"] is True
    llm = vocabs["qwen"]
    pre, suf = special(llm, QWEN_FIM[0]), special(llm, QWEN_FIM[1])
    start = prompt.index(pre)
    assert start == 1024 - 256 - 2 * 16  # the repository context fills the rest
    assert list(prompt[start + 1:start + 1 + 192]) == text(llm, prefix)[-192:]  # 3/4 batch
    assert prompt[start + 1 + 192:prompt.index(suf)] == tuple(text(llm, BODY["prompt"]))


def test_a_model_without_fim_tokens_is_a_400(settings: Settings) -> None:
    [(reply, prompt)] = serve(settings, {**BODY, "model": "plain"})
    assert reply.status_code == 400 and prompt is None
    assert "cannot fill in the middle" in reply.json()["error"]["message"]
