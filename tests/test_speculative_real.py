"""Speculative decoding on the real engine (SmolLM2-135M): prompt lookup and draft models (the
same GGUF, and a Q4_0 requantization of it whose drafts the target sometimes rejects) change
no greedy output, alone or beside other streams, with stop strings and max_tokens; requests
that do not speculate are left alone; acceptance shows in /metrics; a draft model with
another vocabulary is refused at load."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import llama_cpp as lc
import openai
import pytest

from server.engine.llama.gguf import read_gguf
from tests.conftest import LiveServer
from tests.gguf_factory import write_gguf

TEXT = ("The committee met on Tuesday to review the budget for the new library. After a long "
        "discussion about costs, staffing and opening hours, the members agreed to approve the "
        "plan and to publish a report by the end of the month.")
REPEAT = [{"role": "user", "content": f"Repeat this text exactly:\n{TEXT}"}]
FREE = "Once upon a time, in a small village,"
SPECULATING = ("ngram", "self-draft", "q4-draft")


def requantized(source: Path, target: Path) -> Path:
    """`source` requantized to Q4_0: the same vocabulary, slightly different predictions."""
    params = lc.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = lc.LLAMA_FTYPE_MOSTLY_Q4_0, True, 2
    assert lc.llama_model_quantize(str(source).encode(), str(target).encode(), params) == 0
    return target


@pytest.fixture(scope="module")
def live(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    d = tmp_path_factory.mktemp("speculative")
    q4 = requantized(smollm2_path, d / "smollm2-q4_0.gguf")
    other = write_gguf(d / "other-vocab.gguf", "llama")
    entry = f"    path: {smollm2_path}\n    n_ctx: 1024\n"
    (d / "models.yaml").write_text(
        "models:\n"
        f"  plain:\n{entry}"
        f"  ngram:\n{entry}    speculative: {{ngram: true}}\n"
        f"  self-draft:\n{entry}    draft: plain\n"
        f"  q4:\n    path: {q4}\n"
        f"  q4-draft:\n{entry}    draft: q4\n    speculative: {{draft_p_min: 0.0, draft_max: 6}}\n"
        f"  other:\n    path: {other}\n"
        f"  mismatched:\n{entry}    draft: other\n")
    server = LiveServer(["--models-file", str(d / "models.yaml"), "--parallel", "4"])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)


def chat(client: openai.OpenAI, model: str, **kwargs: Any) -> Any:
    fields = {"messages": REPEAT, "temperature": 0, "max_tokens": 64, **kwargs}
    return client.chat.completions.create(model=model, **fields)


def complete(client: openai.OpenAI, model: str, **kwargs: Any) -> Any:
    fields = {"prompt": FREE, "temperature": 0, "max_tokens": 48, **kwargs}
    return client.completions.create(model=model, **fields)


def counts(live: LiveServer, model: str, method: str) -> tuple[float, float]:
    labels = {"model": model, "method": method}
    return (live.metric("ggserve:spec_draft_tokens_total", **labels),
            live.metric("ggserve:spec_accepted_tokens_total", **labels))


@pytest.mark.parametrize("model", SPECULATING)
def test_greedy_output_is_identical_with_and_without_speculation(
        client: openai.OpenAI, live: LiveServer, model: str) -> None:
    method = "ngram" if model == "ngram" else "draft"
    before = counts(live, model, method)
    assert chat(client, model).choices[0].message.content == \
        chat(client, "plain").choices[0].message.content
    drafted, accepted = (a - b for a, b in zip(counts(live, model, method), before, strict=True))
    assert drafted >= accepted > 20  # most of the reply was drafted, verified and accepted
    # free generation: little to look up, and a draft model as often wrong as right
    assert complete(client, model).choices[0].text == complete(client, "plain").choices[0].text


def test_draft_and_verify_beside_other_streams(client: openai.OpenAI) -> None:
    """Drafted sequences batch with the others (and with a prompt being read); each output is
    still the one it has alone."""
    jobs: list[tuple[str, Any]] = [
        ("chat", {"messages": REPEAT}), ("complete", {}),
        ("chat", {"messages": [{"role": "user", "content": "Name three rivers."}]}),
        ("complete", {"prompt": "Lists are useful: 1. apples 2. pears 3. apples 4. pears 5."})]

    def run(model: str, job: tuple[str, Any]) -> str:
        kind, fields = job
        if kind == "chat":
            return str(chat(client, model, **fields).choices[0].message.content)
        return str(complete(client, model, **fields).choices[0].text)

    alone = [run("plain", job) for job in jobs]
    for model in ("ngram", "q4-draft"):
        with ThreadPoolExecutor(len(jobs)) as pool:
            assert list(pool.map(lambda job: run(model, job), jobs)) == alone  # noqa: B023


@pytest.mark.parametrize("model", ["ngram", "q4-draft"])
def test_stop_strings_and_max_tokens_end_a_drafted_reply_where_they_would(
        client: openai.OpenAI, model: str) -> None:
    for fields in ({"stop": ["library"]}, {"max_tokens": 9}, {"stop": [" the"], "n": 2}):
        ours, theirs = chat(client, model, **fields), chat(client, "plain", **fields)
        assert [(c.message.content, c.finish_reason) for c in ours.choices] == \
            [(c.message.content, c.finish_reason) for c in theirs.choices]
        assert ours.usage.completion_tokens == theirs.usage.completion_tokens


def test_seeded_sampling_is_unchanged(client: openai.OpenAI) -> None:
    """Each emitted token is sampled by the same chain calls in the same order."""
    fields = {"temperature": 0.7, "seed": 11, "max_tokens": 48}
    assert chat(client, "ngram", **fields).choices[0].message.content == \
        chat(client, "plain", **fields).choices[0].message.content


def test_grammar_and_logprobs_requests_do_not_speculate(
        client: openai.OpenAI, live: LiveServer) -> None:
    before = counts(live, "ngram", "ngram")
    schema = {"type": "object", "properties": {"text": {"type": "string"}},
              "required": ["text"]}
    shaped = {"response_format": {"type": "json_schema",
                                  "json_schema": {"name": "t", "schema": schema}}}
    for fields in (shaped, {"logprobs": True, "top_logprobs": 2}):
        assert chat(client, "ngram", **fields).choices[0].message.content == \
            chat(client, "plain", **fields).choices[0].message.content
    assert counts(live, "ngram", "ngram") == before


def test_a_draft_model_with_another_vocabulary_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError, match="cannot draft for this model") as caught:
        chat(client, "mismatched", max_tokens=2)
    assert caught.value.status_code >= 500


def test_a_draft_model_counts_in_its_models_memory(client: openai.OpenAI, live: LiveServer,
                                                   smollm2_path: Path) -> None:
    complete(client, "ngram", max_tokens=1)
    complete(client, "self-draft", max_tokens=1)
    models = {m["id"]: m for m in httpx.get(f"{live.url}/v1/models").json()["data"]}
    # the same target either way; self-draft also holds the draft (the same GGUF again) and
    # its context of n_ctx x parallel cells
    draft = read_gguf(smollm2_path)
    expected = draft.weights_bytes + draft.kv_bytes_per_token * 1024 * 4
    ram = {m: models[m]["placement"]["memory_ram_bytes"] for m in ("self-draft", "ngram")}
    extra = ram["self-draft"] - ram["ngram"]
    assert extra == pytest.approx(expected, rel=0.01)
