"""Log-probabilities, echo and the samplers, through the `openai` SDK against the real engine.

The reference is llama-cpp-python's own evaluation of the same tokens with every position's
logits kept: our values must be llama.cpp's log-softmax of those logits.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from llama_cpp import Llama

from tests.conftest import LiveServer, log_softmax, reference_llama

MODEL = "smollm2-135m-instruct"
TEXT = "The capital of France is Paris. The capital of Italy is Rome."
# Different batch shapes may take different matmul kernels.
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
        yield client  # closed: pooled sockets left to the collector are ResourceWarnings


@pytest.fixture(scope="module")
def reference(smollm2_path: Path) -> Llama:
    # flash attention as the server's context has it ("auto" turns it on for the CPU)
    return reference_llama(smollm2_path, n_ctx=512, logits_all=True, flash_attn=True)


def test_echo_with_max_tokens_0_scores_the_prompt_exactly(client: openai.OpenAI,
                                                          reference: Llama) -> None:
    tokens = reference.tokenize(TEXT.encode(), add_bos=False)
    result = client.completions.create(model=MODEL, prompt=tokens, max_tokens=0, echo=True,
                                       logprobs=2)
    choice = result.choices[0]
    lp = choice.logprobs
    assert lp is not None and choice.finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == 0
    assert choice.text == TEXT and "".join(lp.tokens) == TEXT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = log_softmax(reference, tokens)
    for pos in range(1, len(tokens)):
        want = expected[pos - 1, tokens[pos]]
        assert lp.token_logprobs[pos] == pytest.approx(want, abs=TOLERANCE)
        top = lp.top_logprobs[pos]
        assert len(top) == 2
        best = int(np.argmax(expected[pos - 1]))
        assert max(top.values()) == pytest.approx(expected[pos - 1, best], abs=TOLERANCE)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(tokens))]


def test_lm_eval_style_batch_echo_with_one_token(client: openai.OpenAI,
                                                 reference: Llama) -> None:
    """lm-evaluation-harness's loglikelihood request: token prompts, max_tokens 1, logprobs 1."""
    prompts = [reference.tokenize(t.encode(), add_bos=False)
               for t in ("The sky is blue", "Two plus two is four")]
    result = client.completions.create(model=MODEL, prompt=prompts, max_tokens=1, echo=True,
                                       logprobs=1, temperature=0, seed=1234)
    assert [c.index for c in result.choices] == [0, 1]
    for choice, tokens in zip(result.choices, prompts, strict=True):
        lp = choice.logprobs
        assert lp is not None and len(lp.token_logprobs) == len(tokens) + 1
        expected = log_softmax(reference, tokens)
        continuation = lp.token_logprobs[1:len(tokens)]
        want = [expected[p - 1, tokens[p]] for p in range(1, len(tokens))]
        assert continuation == pytest.approx(want, abs=TOLERANCE)
        # the one generated token is the greedy one: its logprob is the best of its position
        assert lp.token_logprobs[-1] == pytest.approx(max(lp.top_logprobs[-1].values()))
    assert result.usage is not None
    assert result.usage.prompt_tokens == sum(len(p) for p in prompts)
    assert result.usage.completion_tokens == 2


def test_completion_logprobs_match_the_text(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12,
                                      temperature=0, logprobs=3)
    lp = whole.choices[0].logprobs
    assert lp is not None and "".join(lp.tokens) == whole.choices[0].text
    assert all(x is not None and x <= 0 for x in lp.token_logprobs)
    assert all(len(t) == 3 for t in lp.top_logprobs)  # type: ignore[arg-type]
    streamed = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12,
                                         temperature=0, logprobs=3, stream=True)
    tokens, values = [], []
    for chunk in streamed:
        for c in chunk.choices:
            if c.logprobs:
                tokens += c.logprobs.tokens
                values += c.logprobs.token_logprobs
    assert tokens == lp.tokens and values == pytest.approx(lp.token_logprobs)


def test_chat_logprobs_and_top_logprobs(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, messages=[{"role": "user", "content": "Hi!"}],
                                  max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(**kwargs)
    choice = whole.choices[0]
    content = choice.logprobs.content if choice.logprobs else None
    assert content and "".join(t.token for t in content) == choice.message.content
    for entry in content:
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True)
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert math.isfinite(entry.logprob) and entry.logprob <= 0
    streamed = [e for chunk in client.chat.completions.create(**kwargs, stream=True)
                for c in chunk.choices if c.logprobs and c.logprobs.content
                for e in c.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    without = client.chat.completions.create(**{**kwargs, "logprobs": False, "top_logprobs": None})
    assert without.choices[0].logprobs is None


def test_top_logprobs_without_logprobs_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       top_logprobs=2)


def test_bad_token_ids_are_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="not in this model's vocabulary"):
        client.completions.create(model=MODEL, prompt=[1, 2, 10_000_000], max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="not in this model's vocabulary"):
        client.completions.create(model=MODEL, prompt="x", max_tokens=1,
                                  extra_body={"stop_token_ids": [-5]})


# ---------------------------------------------------------------- samplers ----------------


def complete(client: openai.OpenAI, prompt: str, **kwargs: Any) -> str:
    return client.completions.create(model=MODEL, prompt=prompt,
                                     **{"max_tokens": 8, **kwargs}).choices[0].text


def test_top_k_1_and_min_p_1_are_greedy_whatever_the_seed(client: openai.OpenAI) -> None:
    prompt = "My favourite fruit is"
    greedy = complete(client, prompt, temperature=0)
    for seed in (1, 2, 3):
        assert complete(client, prompt, temperature=1.5, seed=seed,
                        extra_body={"top_k": 1}) == greedy
        assert complete(client, prompt, temperature=1.5, seed=seed, top_p=1.0,
                        extra_body={"min_p": 1.0, "top_k": 0}) == greedy
    # and without them, sampling at a high temperature does vary
    varied = {complete(client, prompt, temperature=1.5, seed=s, extra_body={"top_k": 0})
              for s in range(6)}
    assert len(varied) > 1


def test_logit_bias_forces_and_bans_tokens(client: openai.OpenAI, reference: Llama) -> None:
    (banana,) = reference.tokenize(b" banana", add_bos=False)
    text = complete(client, "My favourite fruit is", temperature=0,
                    logit_bias={str(banana): 100})
    assert text.startswith(" banana banana")
    prompt = "red blue red blue red blue red blue"
    assert complete(client, prompt, temperature=0).startswith(" blue blue")
    (blue,) = reference.tokenize(b" blue", add_bos=False)
    assert " blue" not in complete(client, prompt, temperature=0, logit_bias={str(blue): -100})


@pytest.mark.parametrize("penalty", [{"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
                                     {"extra_body": {"repeat_penalty": 3.0}}])
def test_penalties_break_repetition(client: openai.OpenAI, penalty: dict[str, Any]) -> None:
    prompt = "red blue red blue red blue red blue"  # greedy: " blue blue blue ..."
    assert complete(client, prompt, temperature=0).startswith(" blue blue")
    # the prompt's own tokens count too (llama-server's window): " blue" is penalised at once
    assert not complete(client, prompt, temperature=0, **penalty).startswith(" blue")


def test_stop_as_token_ids(client: openai.OpenAI, reference: Llama) -> None:
    prompt = "Count: 1, 2, 3, 4, 5,"
    text = complete(client, prompt, temperature=0, max_tokens=12)
    tokens = reference.tokenize(text.encode(), add_bos=False)
    stop_at = tokens[3]
    cut = reference.detokenize(tokens[:tokens.index(stop_at)]).decode()
    for extra in ({"stop": [stop_at]}, {"stop_token_ids": [stop_at]}):
        result = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                           temperature=0, extra_body=extra)
        assert result.choices[0].text == cut
        assert result.choices[0].finish_reason == "stop"
