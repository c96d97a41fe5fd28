"""The real path: the `openai` SDK against `python -m server` running llama.cpp on SmolLM2."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from llama_cpp import Llama

from server.chat.template import prompt_text, render_chat
from tests.conftest import LiveServer

MODEL = "smollm2-135m-instruct"
GREEDY: dict[str, Any] = {"temperature": 0, "seed": 7}


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        yield client  # closed: pooled sockets left to the collector are ResourceWarnings


@pytest.fixture(scope="module")
def vocab(smollm2_path: Path) -> Llama:
    return Llama(str(smollm2_path), vocab_only=True, verbose=False)


def chat(client: openai.OpenAI, content: str, **kwargs: Any) -> Any:
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **{**GREEDY, **kwargs})


def stream_chat(client: openai.OpenAI, content: str, **kwargs: Any) -> tuple[list[str], Any]:
    """The content deltas of a streamed chat, and its last chunk."""
    deltas, last = [], None
    for chunk in chat(client, content, stream=True, **kwargs):
        last = chunk
        for choice in chunk.choices:
            if choice.delta.content:
                deltas.append(choice.delta.content)
    return deltas, last


def test_chat_stream_equals_non_stream_and_usage_is_exact(client: openai.OpenAI,
                                                         vocab: Llama) -> None:
    question = "Name three colours of the rainbow."
    whole = chat(client, question, max_tokens=24)
    deltas, last = stream_chat(client, question, max_tokens=24,
                               stream_options={"include_usage": True})
    text = whole.choices[0].message.content
    assert text and "".join(deltas) == text
    assert whole.choices[0].finish_reason in ("stop", "length")
    # usage: the prompt as the model's own template renders it, re-tokenized by llama.cpp
    template = vocab.metadata["tokenizer.chat_template"]
    prompt = prompt_text(render_chat(template, [{"role": "user", "content": question}]))
    assert whole.usage.prompt_tokens == len(vocab.tokenize(prompt.encode(), add_bos=False,
                                                           special=True))
    assert whole.usage.completion_tokens == len(vocab.tokenize(text.encode(), add_bos=False))
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert last.usage is not None and last.choices == []
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [getattr(last.usage, k) for k in counts] == [getattr(whole.usage, k) for k in counts]
    # the second request found the first one's prompt in the KV cache
    assert last.usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 1


def test_completion_stream_equals_non_stream_and_usage_is_exact(client: openai.OpenAI,
                                                               vocab: Llama) -> None:
    prompt = "The capital of France is"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, **GREEDY)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                            stream=True, **GREEDY))
    text = whole.choices[0].text
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert whole.choices[0].finish_reason == "length"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # usage only when include_usage is asked
    assert whole.usage.prompt_tokens == len(vocab.tokenize(prompt.encode(), special=True))
    assert whole.usage.completion_tokens == 12 == len(vocab.tokenize(text.encode(),
                                                                     add_bos=False))


def test_max_tokens_ends_with_length(client: openai.OpenAI) -> None:
    reply = chat(client, "Tell me a long story about a dragon.", max_completion_tokens=5)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5


def test_stop_string_split_across_tokens_never_leaks(client: openai.OpenAI) -> None:
    question = "Write a sentence about the sea."
    deltas, _ = stream_chat(client, question, max_tokens=30)
    # A stop string made of the end of one token and the start of the next one.
    k = next(i for i in range(2, len(deltas) - 1)
             if len(deltas[i]) >= 2 and len(deltas[i + 1]) >= 2 and deltas[i].strip())
    stop = deltas[k][-2:] + deltas[k + 1][:2]
    full = "".join(deltas)
    expected = full[:full.index(stop)]
    for stream in (False, True):
        if stream:
            got_deltas, last = stream_chat(client, question, max_tokens=30, stop=[stop])
            got, finish = "".join(got_deltas), last.choices[0].finish_reason
        else:
            reply = chat(client, question, max_tokens=30, stop=stop)
            got, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
        assert got == expected
        assert stop not in got and finish == "stop"


def test_multibyte_characters_split_across_tokens_arrive_whole(client: openai.OpenAI) -> None:
    question = "Write the word 'hello' in Japanese, Chinese and Korean."
    whole = chat(client, question, max_tokens=40)
    deltas, _ = stream_chat(client, question, max_tokens=40)
    text = whole.choices[0].message.content
    wide = [ch for ch in text if len(ch.encode()) > 1]
    # The model spends more tokens than characters: characters were split across tokens.
    assert len(wide) >= 5 and whole.usage.completion_tokens > len(text)
    assert "\ufffd" not in text
    assert "".join(deltas) == text
    for delta in deltas:
        delta.encode("utf-8")  # each delta is whole characters (no surrogates, no U+FFFD)
        assert "\ufffd" not in delta


def test_n_returns_n_choices(client: openai.OpenAI, vocab: Llama) -> None:
    reply = chat(client, "Say something.", n=3, temperature=1.0, seed=3, max_tokens=8)
    texts = [c.message.content for c in reply.choices]
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(texts) and len(set(texts)) > 1  # independent samples, not one copied
    assert reply.usage.completion_tokens == sum(
        len(vocab.tokenize(t.encode(), add_bos=False)) for t in texts)


def test_two_concurrent_streams_both_complete_correctly(client: openai.OpenAI) -> None:
    questions = ["Describe a cat.", "Explain what rain is."]
    alone = [chat(client, q, max_tokens=32).choices[0].message.content for q in questions]

    def streamed(question: str) -> tuple[str, Any]:
        deltas, last = stream_chat(client, question, max_tokens=32,
                                   stream_options={"include_usage": True})
        return "".join(deltas), last.usage

    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(streamed, questions))
    for (text, usage), solo in zip(together, alone, strict=True):
        assert usage.completion_tokens == 32
        # Greedy text under batching can drift from the solo run once it is many tokens in
        # (other batch shapes and cached KV round differently, as in llama-server); each
        # answer must still be its own question's, from the start.
        assert text.split()[:4] == solo.split()[:4]
    assert together[0][0] != together[1][0]


def test_health_answers_during_generation(client: openai.OpenAI, server: LiveServer) -> None:
    done = threading.Event()

    def long_generation() -> None:
        stream_chat(client, "Write a very long essay about history.", max_tokens=400,
                    temperature=0.8)
        done.set()

    worker = threading.Thread(target=long_generation)
    worker.start()
    time.sleep(0.5)
    started = time.monotonic()
    assert httpx.get(f"{server.url}/health", timeout=2).json() == {"status": "ok"}
    assert time.monotonic() - started < 0.5 and not done.is_set()
    worker.join()


def test_disconnect_mid_stream_stops_generation(client: openai.OpenAI,
                                               server: LiveServer) -> None:
    cancelled_before = server.metric("ggserve:requests_total", model=MODEL, endpoint="chat",
                                     outcome="cancelled")
    stream = chat(client, "Write a very long essay about the ocean.", max_tokens=4000,
                  temperature=0.8, stream=True)
    for _, _chunk in zip(range(5), stream, strict=False):
        pass
    stream.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and server.metric(
            "ggserve:num_sequences_running", model=MODEL) > 0:
        time.sleep(0.05)
    assert server.metric("ggserve:num_sequences_running", model=MODEL) == 0
    calls = server.metric("ggserve:decode_calls_total", model=MODEL)
    time.sleep(0.5)
    assert server.metric("ggserve:decode_calls_total", model=MODEL) == calls  # no more decoding
    assert server.metric("ggserve:requests_total", model=MODEL, endpoint="chat",
                         outcome="cancelled") == cancelled_before + 1


def test_errors_are_openai_shaped(client: openai.OpenAI, server: LiveServer) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as overflow:
        client.completions.create(model=MODEL, prompt="hello " * 9000, max_tokens=10)
    assert overflow.value.body["code"] == "context_length_exceeded"
    assert "8192" in overflow.value.body["message"]
    assert overflow.value.body["n_ctx"] == 8192
    assert overflow.value.body["n_prompt_tokens"] > 8192 - 10  # clients trim by these
    bad = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json",
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    # ... and the server still serves.
    assert chat(client, "Hi", max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_metrics_count_requests_and_tokens(client: openai.OpenAI, server: LiveServer) -> None:
    before = {name: server.metric(f"ggserve:{name}", model=MODEL)
              for name in ("prompt_tokens_total", "generation_tokens_total",
                           "time_to_first_token_seconds_count")}
    reply = chat(client, "Count to three.", max_tokens=6)
    after = {name: server.metric(f"ggserve:{name}", model=MODEL) for name in before}
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == \
        reply.usage.prompt_tokens
    assert after["generation_tokens_total"] - before["generation_tokens_total"] == \
        reply.usage.completion_tokens
    assert after["time_to_first_token_seconds_count"] == \
        before["time_to_first_token_seconds_count"] + 1
