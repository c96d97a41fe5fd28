"""Scheduler limits on a small configuration: context end, queueing, chunked prefill."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import LiveServer

MODEL = "tiny-ctx"
N_CTX, PARALLEL, BATCH, MAX_WAITING = 96, 2, 16, 3


@pytest.fixture(scope="module")
def small(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    registry = tmp_path_factory.mktemp("registry") / "models.yaml"
    registry.write_text(f"models:\n  {MODEL}:\n    path: {smollm2_path}\n    n_ctx: {N_CTX}\n")
    live = LiveServer(["--models-file", str(registry), "--parallel", str(PARALLEL)],
                      env={"GGSERVE_BATCH_TOKENS": str(BATCH),
                           "GGSERVE_MAX_WAITING": str(MAX_WAITING)})
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(small: LiveServer) -> Iterator[openai.OpenAI]:
    # closed at the end: its pooled sockets left to the garbage collector fail the session
    # with ResourceWarnings (warnings are errors), whenever a collection happens to find them
    with openai.OpenAI(base_url=f"{small.url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def complete(client: openai.OpenAI, prompt: str, **kwargs: Any) -> Any:
    return client.completions.create(model=MODEL, prompt=prompt, temperature=0.8,
                                     logit_bias={"0": -100, "2": -100, "4": -100}, **kwargs)


def test_running_out_of_context_ends_with_length(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me everything about whales."}],
        logit_bias={"0": -100, "2": -100, "4": -100})
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.total_tokens == N_CTX


def test_requests_beyond_parallel_wait_and_all_complete(client: openai.OpenAI) -> None:
    # One more than runs at once (all arriving together stay within the queue's limit).
    prompts = [f"Story number {i}:" for i in range(PARALLEL + 1)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(lambda p: complete(client, p, max_tokens=12), prompts))
    assert all(r.usage.completion_tokens == 12 for r in replies)
    assert all(r.choices[0].finish_reason == "length" for r in replies)


def test_long_prompt_is_read_in_chunks_beside_a_running_stream(client: openai.OpenAI,
                                                               small: LiveServer) -> None:
    calls = lambda: small.metric("ggserve:decode_calls_total", model=MODEL)  # noqa: E731
    prompt = "Once upon a time, in a quiet village by the sea, " * 4

    before = calls()
    alone = complete(client, prompt, max_tokens=4)
    steps_alone = calls() - before
    # A prompt longer than one batch takes one step per chunk, then one per further token.
    assert steps_alone == math.ceil(alone.usage.prompt_tokens / BATCH) + 3

    before = calls()
    started = threading.Event()

    def runner() -> None:
        for _ in complete(client, "A long tale:", max_tokens=40, stream=True):
            started.set()

    thread = threading.Thread(target=runner)
    thread.start()
    started.wait(30)
    second = complete(client, "Again: " + prompt, max_tokens=4)  # no cached prefix
    thread.join()
    # Alone, the stream takes 40 steps and the second request ceil(P/16) + 3: the prompt's
    # chunks were decoded in the same steps as the stream's tokens.
    assert calls() - before < 40 + math.ceil(second.usage.prompt_tokens / BATCH)
    assert second.usage.prompt_tokens_details.cached_tokens == 0


def test_a_full_queue_answers_503_with_retry_after(client: openai.OpenAI,
                                                   small: LiveServer) -> None:
    def long_one(i: int) -> Any:
        return complete(client, f"Tale {i}:", max_tokens=70)

    def until(metric: str, value: int) -> None:
        for _ in range(500):
            if small.metric(metric, model=MODEL) == value:
                return
            time.sleep(0.01)
        raise AssertionError(f"{metric} never reached {value}")

    with ThreadPoolExecutor(PARALLEL + MAX_WAITING) as pool:
        futures = [pool.submit(long_one, i) for i in range(PARALLEL)]
        until("ggserve:num_sequences_running", PARALLEL)
        futures += [pool.submit(long_one, i) for i in range(PARALLEL, PARALLEL + MAX_WAITING)]
        for _ in range(500):  # the moment /ready calls the queue full, the gauge says so too
            ready = httpx.get(f"{small.url}/ready")
            if ready.status_code == 503:
                break
            time.sleep(0.01)
        assert "a request queue is full" in ready.json()["problems"]
        assert small.metric("ggserve:num_requests_waiting", model=MODEL) == MAX_WAITING
        response = httpx.post(f"{small.url}/v1/completions",
                              json={"model": MODEL, "prompt": "one more", "max_tokens": 2})
        assert all(f.result().usage.completion_tokens == 70 for f in futures)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "server_overloaded"
    assert complete(client, "after the rush", max_tokens=2).usage.completion_tokens == 2


def test_logit_bias_outside_the_vocabulary_is_a_400_naming_the_id(client: openai.OpenAI) -> None:
    # The API layer cannot know the vocabulary; the engine checks the ids before decoding.
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2,
                                  logit_bias={"1000000000": 5})
    assert refused.value.body["param"] == "logit_bias"  # type: ignore[index]
    assert "1000000000" in refused.value.body["message"]  # type: ignore[index]
