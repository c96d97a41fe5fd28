"""/tokenizer_info, /tokenize and /detokenize on the real llama.cpp: the tokens are those the
generation endpoints feed the model, and lm-evaluation-harness's remote tokenizer works."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from llama_cpp import Llama

from tests.conftest import LiveServer
from tests.gguf_factory import write_gguf

MODEL = "smollm2-135m-instruct"
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a planet <|im_end|> please."}]


@pytest.fixture(scope="module")
def vocab(smollm2_path: Path) -> Llama:
    return Llama(str(smollm2_path), vocab_only=True, verbose=False)


def post(live: LiveServer, path: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{live.url}{path}", json=body, timeout=60)


def test_tokenize_then_detokenize_gives_the_text_back(server: LiveServer, vocab: Llama) -> None:
    for text in ["Hello world<|im_end|> and more", "naïve café, 日本語 🙂", "  two  spaces\n"]:
        reply = post(server, "/tokenize", prompt=text, add_special_tokens=False).json()
        assert reply["tokens"] == vocab.tokenize(text.encode(), add_bos=False, special=True)
        assert reply["count"] == len(reply["tokens"]) and reply["max_model_len"] == 8192
        assert reply["token_strs"] is None
        assert post(server, "/detokenize", tokens=reply["tokens"]).json() == {"prompt": text}


def test_token_strs_are_the_vocabulary_entries(server: LiveServer) -> None:
    reply = post(server, "/tokenize", prompt="Hello world<|im_end|>",
                 return_token_strs=True).json()
    assert reply["token_strs"] == ["Hello", "Ġworld", "<|im_end|>"]


def test_prompt_tokens_are_what_completions_reads(server: LiveServer) -> None:
    prompt = "The capital of France is"
    tokens = post(server, "/tokenize", prompt=prompt).json()
    reply = post(server, "/v1/completions", model=MODEL, prompt=prompt, max_tokens=1).json()
    assert tokens["count"] == reply["usage"]["prompt_tokens"]


def test_messages_tokens_are_what_chat_reads(server: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    tokens = post(server, "/tokenize", model=MODEL, messages=MESSAGES).json()
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES,  # type: ignore[arg-type]
                                           max_tokens=1, temperature=0)
    assert tokens["count"] == reply.usage.prompt_tokens
    # message text is never parsed for special tokens, exactly as in chat
    strs = post(server, "/tokenize", messages=MESSAGES, return_token_strs=True).json()
    assert strs["token_strs"].count("<|im_end|>") == 2
    bare = post(server, "/tokenize", messages=MESSAGES, add_generation_prompt=False).json()
    assert bare["tokens"] == tokens["tokens"][:bare["count"]] and \
        bare["count"] < tokens["count"]


@pytest.fixture
def embed_model(server: LiveServer) -> Iterator[str]:
    yield "smollm2-135m-embed"
    # the shared server goes on as the other modules expect it: the default model alone
    post(server, "/models/unload", model="smollm2-135m-embed")


def test_tokenizer_info(server: LiveServer, vocab: Llama, embed_model: str) -> None:
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info == {
        "model": MODEL, "tokenizer_class": "llama.cpp", "vocab_type": "bpe",
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "chat_template": vocab.metadata["tokenizer.chat_template"],
        "model_max_length": 8192, "add_bos_token": False}
    embed = httpx.get(f"{server.url}/tokenizer_info", params={"model": embed_model}).json()
    assert embed["model_max_length"] == 512


def test_errors(server: LiveServer, embed_model: str) -> None:
    bad = post(server, "/detokenize", tokens=[1, 49152])
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == \
        "Token id 49152 is not in this model's vocabulary (ids 0 to 49151)."
    assert post(server, "/tokenize", model="gpt-4", prompt="hi").status_code == 404
    both = post(server, "/tokenize", prompt="a", messages=MESSAGES)
    assert both.status_code == 400 and "either 'prompt'" in both.json()["error"]["message"]
    chat = post(server, "/tokenize", model=embed_model, messages=MESSAGES)
    assert chat.status_code == 400 and "embedding model" in chat.json()["error"]["message"]


def test_lm_eval_detects_and_uses_the_remote_tokenizer(server: LiveServer,
                                                       vocab: Llama) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its optional back-ends warn on import
        from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support
    base_url = f"{server.url}/v1/completions"  # as local-completions is given it
    assert check_remote_tokenizer_support(base_url)
    tokenizer = RemoteTokenizer(base_url)
    tokens = tokenizer.encode("Hello world")
    assert tokens == vocab.tokenize(b"Hello world", add_bos=False, special=True)
    assert tokenizer.decode(tokens) == "Hello world"
    assert tokenizer.eos_token_id == vocab.token_eos()


# ---- a vocabulary that asks for a BOS (SmolLM2's does not) --------------------------------

BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
                "{% endfor %}")


@pytest.fixture(scope="module")
def bos_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    d = tmp_path_factory.mktemp("bos")
    model = write_gguf(d / "llama.gguf", "llama", chat_template=BOS_TEMPLATE, add_bos=True)
    registry = d / "models.yaml"
    registry.write_text(f"""
models:
  tiny-own-template:   # its template writes the BOS
    path: {model}
    n_ctx: 256
  tiny-chatml:         # ChatML has none: the BOS comes from the vocabulary
    path: {model}
    template: chatml
    n_ctx: 256
""")
    live = LiveServer(["--models-file", str(registry)])
    yield live
    live.stop()


def test_add_special_tokens_adds_the_bos_only_when_asked(bos_server: LiveServer) -> None:
    info = httpx.get(f"{bos_server.url}/tokenizer_info").json()
    assert info["add_bos_token"] is True and info["bos_token"] == "<s>"
    plain = post(bos_server, "/tokenize", prompt="hello world", add_special_tokens=False).json()
    added = post(bos_server, "/tokenize", prompt="hello world").json()
    assert added["tokens"] == [1, *plain["tokens"]] and 1 not in plain["tokens"]
    reply = post(bos_server, "/v1/completions", model="tiny-own-template", prompt="hello world",
                 max_tokens=1).json()
    assert reply["usage"]["prompt_tokens"] == added["count"]
    text = post(bos_server, "/detokenize", tokens=plain["tokens"]).json()["prompt"]
    assert text == "hello world"
    # a SentencePiece word's leading space stays after a BOS, as HF's decode keeps it
    text = post(bos_server, "/detokenize", tokens=added["tokens"]).json()["prompt"]
    assert text == "<s> hello world"


@pytest.mark.parametrize("model", ["tiny-own-template", "tiny-chatml"])
def test_messages_start_with_one_bos_as_chat_reads_them(bos_server: LiveServer,
                                                        model: str) -> None:
    messages = [{"role": "user", "content": "hello"}]
    tokens = post(bos_server, "/tokenize", model=model, messages=messages).json()
    assert tokens["tokens"][:2].count(1) == 1 and tokens["tokens"][0] == 1
    reply = post(bos_server, "/v1/chat/completions", model=model, messages=messages,
                 max_tokens=1).json()
    assert reply["usage"]["prompt_tokens"] == tokens["count"]
