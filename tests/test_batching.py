"""Continuous batching on the real engine: prefix reuse, no cross-talk, parity with llama.cpp."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from llama_cpp import Llama

from tests.conftest import LiveServer, reference_llama

MODEL = "smollm2-135m-instruct"
SYSTEM = ("You are a meticulous assistant for a shipping company. You answer questions about "
          "parcels, tracking numbers, customs forms and delivery windows, politely and briefly.")


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        yield client  # closed: pooled sockets left to the collector are ResourceWarnings


def ask(client: openai.OpenAI, messages: list[dict[str, str]], **kwargs: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                          temperature=0, max_tokens=16, **kwargs)


def test_same_prompt_again_reuses_its_kv_and_answers_the_same(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": "Where is parcel 4471?"}]
    first = ask(client, messages)
    again = ask(client, messages)
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert again.choices[0].message.content == first.choices[0].message.content


def test_next_turn_skips_the_shared_history(client: openai.OpenAI) -> None:
    turn1 = [{"role": "system", "content": SYSTEM},
             {"role": "user", "content": "Can I send batteries abroad?"}]
    reply = ask(client, turn1)
    turn2 = [*turn1, {"role": "assistant", "content": reply.choices[0].message.content},
             {"role": "user", "content": "And perfume?"}]
    second = ask(client, turn2)
    # Everything up to the end of the first prompt was already in the KV cache.
    assert second.usage.prompt_tokens_details.cached_tokens >= reply.usage.prompt_tokens - 1


def test_concurrent_requests_never_see_each_others_tokens(client: openai.OpenAI,
                                                          smollm2_path: Path) -> None:
    vocab = Llama(str(smollm2_path), vocab_only=True, verbose=False)
    words = [" apple", " river", " stone", " cloud"]
    forced = [vocab.tokenize(w.encode(), add_bos=False) for w in words]
    assert all(len(t) == 1 for t in forced)

    def forced_stream(token: int) -> str:
        stream = client.completions.create(
            model=MODEL, prompt="List:", max_tokens=24, temperature=0.9, stream=True,
            logit_bias={str(token): 100})
        return "".join(c.choices[0].text for c in stream if c.choices)

    with ThreadPoolExecutor(len(words)) as pool:
        outputs = list(pool.map(forced_stream, [t[0] for t in forced]))
    for word, output in zip(words, outputs, strict=True):
        assert output == word * 24


def test_greedy_output_equals_llama_cpp_python(client: openai.OpenAI, smollm2_path: Path) -> None:
    llm = reference_llama(smollm2_path, n_ctx=512, seed=1)
    prompt = "The three most important inventions in history are"
    theirs = llm.create_completion(prompt, max_tokens=40, temperature=0)
    ours = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0,
                                     extra_body={"repeat_penalty": 1.0})
    assert ours.choices[0].text == theirs["choices"][0]["text"]  # type: ignore[index]


def test_n_choices_all_see_the_whole_prompt(client: openai.OpenAI) -> None:
    # Greedy: every choice must continue the same prompt identically. A choice whose sequence
    # lacked the prompt's KV (its copy) would say something else.
    messages = [{"role": "user", "content": "List three kinds of trees, then stop."}]
    solo = ask(client, messages)
    both = ask(client, messages, n=3)
    texts = [c.message.content for c in both.choices]
    assert texts == [solo.choices[0].message.content] * 3
