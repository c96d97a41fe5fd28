"""LoRA adapters on the real engine, with a tiny factory model and adapters generated to have an
effect we predict.

The model's token embeddings share a constant first component, so the final norm's first
output x0 stays near 5.7 at every position. `bias` (on output.weight: A = e0, B = 10 at token
T) adds 10·x0 to T's logit and nothing to any other: greedy output under it is T, log-
probabilities equal those of the model with B·A merged into output.weight, and every other
token's log-probability moves by the same amount. `kv` (random, on attn_k, attn_v and ffn_up of
every layer) changes every layer's KV, so reusing KV across adapters would change the output.
"""

from __future__ import annotations

import asyncio
import shutil
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from server import hub
from server.app import create_app
from server.engine.llama.lora import TURN_STEPS, Turns
from server.engine.llama.scheduler import Scheduler
from server.engine.manager import LlamaEngine
from server.metrics import Metrics, SchedulerMetrics
from server.settings import Settings
from tests.gguf_factory import SHAPES, vocabulary, write_gguf, write_lora

SHAPE = SHAPES["tiny"]
TOKENS = vocabulary()[0]
T = TOKENS.index("▁him")  # the token `bias` pushes
PROMPTS = ["The sky is", "Once upon a time there", "hello world model token",
           "water and fire and earth"]
# Token texts that name one token (top_logprobs is keyed by text: "[" is a piece and a byte)
_TEXTS = [chr(int(t[3:5], 16)) if t.startswith("<0x") else t.replace("▁", " ") for t in TOKENS]
UNIQUE = {t for t, n in Counter(_TEXTS).items() if n == 1}
# a prompt long enough for prefix reuse (over 32 tokens)
LONG = ("The committee met on Tuesday to review the budget for the new library. After a long "
        "talk about cost, staff and hours, the members agreed to the plan.")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def registry_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("lora")
    rng = np.random.default_rng(1)
    e, n_vocab = SHAPE.n_embd, len(TOKENS)
    embeddings = rng.standard_normal((n_vocab, e)).astype(np.float32) * 0.02
    embeddings[:, 0] = 0.16
    output = rng.standard_normal((n_vocab, e)).astype(np.float32) * 0.02
    a, b = np.zeros((1, e), np.float32), np.zeros((n_vocab, 1), np.float32)
    a[0, 0], b[T, 0] = 1.0, 10.0
    tensors = {"token_embd.weight": embeddings, "output.weight": output}
    write_gguf(d / "m.gguf", "llama", tensors=tensors)
    write_gguf(d / "merged.gguf", "llama", tensors={**tensors, "output.weight": output + b @ a})
    write_lora(d / "bias.gguf", "llama", {"output.weight": (a, b)})  # alpha 0: scale 1
    kv = {}
    for i in range(SHAPE.n_layer):
        for name, rows in (("attn_k", SHAPE.n_embd_kv), ("attn_v", SHAPE.n_embd_kv),
                           ("ffn_up", SHAPE.n_ff)):
            kv[f"blk.{i}.{name}.weight"] = (rng.standard_normal((4, e)) * 0.5,
                                            rng.standard_normal((rows, 4)) * 0.5)
    write_lora(d / "kv.gguf", "llama", kv, alpha=4)
    write_lora(d / "wrong.gguf", "llama", {"output.weight": (np.ones((1, e // 2)),
                                                              np.ones((n_vocab, 1)))})
    adapters = "    lora:\n      - {name: bias, path: bias.gguf}\n" \
               "      - {name: kv, path: kv.gguf}\n"
    (d / "models.yaml").write_text(
        "models:\n"
        f"  m:\n    path: m.gguf\n    n_ctx: 256\n{adapters}"
        "  merged:\n    path: merged.gguf\n    n_ctx: 256\n"
        f"  spec:\n    path: m.gguf\n    n_ctx: 256\n    speculative: {{ngram: true}}\n{adapters}"
        f"  drafted:\n    path: m.gguf\n    n_ctx: 256\n    draft: merged\n"
        f"    speculative: {{draft_p_min: 0.0}}\n{adapters}"
        "  broken:\n    path: m.gguf\n    lora: [{name: wrong, path: wrong.gguf}]\n")
    return d / "models.yaml"


@pytest.fixture
async def app(registry_file: Path) -> AsyncIterator[FastAPI]:
    """A fresh engine (empty caches) for each test."""
    application = create_app(Settings(models_file=registry_file, parallel=4, batch_tokens=64,
                                      threads=2, metrics_vllm_names=True))
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def http(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t", timeout=60) as client:
        yield client


async def complete(http: httpx.AsyncClient, model: str, prompt: str, **fields: Any) -> Any:
    reply = await http.post("/v1/completions", json={
        "model": model, "prompt": prompt, "temperature": 0, "max_tokens": 12, **fields})
    assert reply.status_code == 200, reply.text
    return reply.json()


def text(reply: Any) -> str:
    return str(reply["choices"][0]["text"])


def scheduler(app: FastAPI, model: str = "m") -> Scheduler:
    engine: LlamaEngine = app.state.engine
    worker = engine._resident[model].worker
    assert isinstance(worker, Scheduler)
    return worker


@pytest.mark.anyio
async def test_the_bias_adapter_adds_exactly_its_low_rank_product_to_the_logits(
        http: httpx.AsyncClient) -> None:
    fields = {"logprobs": 5, "echo": True}
    base, biased, merged = [await complete(http, model, PROMPTS[0], **fields)
                            for model in ("m", "m:bias", "merged")]
    assert biased["model"] == "m:bias" and base["model"] == "m"
    him = TOKENS[T].replace("▁", " ")
    assert text(biased) == PROMPTS[0] + him * 12  # greedy: T at every step
    assert him not in text(base)
    # The adapter's log-probabilities are those of W + B·A, at every position.
    ours, theirs = biased["choices"][0]["logprobs"], merged["choices"][0]["logprobs"]
    assert ours["tokens"] == theirs["tokens"]
    assert np.allclose(ours["token_logprobs"][1:], theirs["token_logprobs"][1:], atol=1e-4)
    # Reading the prompt, only T's logit moved: every other token's log-probability shifts by
    # the same amount (the normaliser's growth), T's became the most likely.
    before, after = base["choices"][0]["logprobs"], ours
    for position in range(1, base["usage"]["prompt_tokens"]):
        shared = [t for t in before["top_logprobs"][position] if t != him and t in UNIQUE]
        shifts = [after["top_logprobs"][position].get(t) for t in shared]
        if None in shifts:  # pushed out of the top 5 by T: compare the chosen tokens instead
            continue
        moved = np.array(shifts) - np.array([before["top_logprobs"][position][t]
                                             for t in shared])
        assert np.ptp(moved) < 1e-4 and moved[0] < -10
        assert max(after["top_logprobs"][position].items(), key=lambda kv: kv[1])[0] == him


@pytest.mark.anyio
async def test_requests_under_different_adapters_run_together_as_they_run_alone(
        app: FastAPI, http: httpx.AsyncClient) -> None:
    jobs = [(model, prompt) for prompt in PROMPTS[:2] for model in ("m", "m:bias", "m:kv")]
    alone = [text(await complete(http, model, prompt, max_tokens=16))
             for model, prompt in jobs]
    assert len({alone[0], alone[2]}) == 2  # `kv` changes the output (the test can fail)
    worker = scheduler(app)
    switches = worker._adapters.switches
    steps = int(app.state.metrics.decode_calls.labels("m")._value.get())
    together = await asyncio.gather(*(complete(http, model, prompt, max_tokens=16)
                                      for model, prompt in jobs))
    assert [text(r) for r in together] == alone
    assert [r["model"] for r in together] == [model for model, _ in jobs]
    # Groups take turns: the adapters changed, but not at every step.
    switched = worker._adapters.switches - switches
    stepped = int(app.state.metrics.decode_calls.labels("m")._value.get()) - steps
    assert switched >= 2 and 2 * switched <= stepped


@pytest.mark.anyio
async def test_prefix_reuse_never_crosses_adapters(registry_file: Path,
                                                   http: httpx.AsyncClient) -> None:
    async def alone(model: str) -> str:
        application = create_app(Settings(models_file=registry_file, parallel=4,
                                          batch_tokens=64, threads=2))
        async with application.router.lifespan_context(application), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=application), base_url="http://t") as fresh:
            return text(await complete(fresh, model, LONG))

    truth = {model: await alone(model) for model in ("m", "m:kv")}
    assert truth["m"] != truth["m:kv"]
    for model, reused in (("m", False), ("m:kv", False), ("m", False), ("m", True),
                          ("m:kv", False), ("m:kv", True)):
        reply = await complete(http, model, LONG)
        cached = reply["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert text(reply) == truth[model], model
        assert (cached > 32) == reused, (model, cached)


@pytest.mark.anyio
async def test_speculation_under_an_adapter_verifies_with_the_adapter(
        app: FastAPI, http: httpx.AsyncClient) -> None:
    """Prompt lookup and a draft model (which has no adapter) only guess; the model checks
    the guesses under the request's adapter."""
    drafted = app.state.metrics.spec_draft_tokens
    for prompt in PROMPTS:
        plain = text(await complete(http, "m:kv", prompt, max_tokens=24))
        assert plain != text(await complete(http, "spec", prompt, max_tokens=24))
        for model in ("spec:kv", "drafted:kv", "drafted:bias"):
            expected = plain if model.endswith(":kv") else text(
                await complete(http, "m:bias", prompt, max_tokens=24))
            assert text(await complete(http, model, prompt, max_tokens=24)) == expected, model
    assert drafted.labels("spec", "ngram")._value.get() > 0
    assert drafted.labels("drafted", "draft")._value.get() > 0


@pytest.mark.anyio
async def test_adapters_load_with_the_model_and_count_in_its_memory(
        app: FastAPI, http: httpx.AsyncClient, registry_file: Path) -> None:
    await complete(http, "merged", "x", max_tokens=1)
    engine: LlamaEngine = app.state.engine
    with_adapters, without = engine.status("m"), engine.status("merged")
    sizes = sum((registry_file.parent / f).stat().st_size for f in ("bias.gguf", "kv.gguf"))
    # the adapters' tensors (their files less the headers) on top of the same weights
    assert 0.9 * sizes < with_adapters.memory_ram - without.memory_ram <= sizes
    metrics = (await http.get("/metrics")).text
    assert 'max_lora="2"' in metrics and "vllm:lora_requests_info{" in metrics
    unknown = await http.post("/v1/completions", json={"model": "m:nope", "prompt": "x"})
    assert unknown.status_code == 404
    assert "m:bias, m:kv" in unknown.json()["error"]["message"]
    await http.post("/models/unload", json={"model": "m"})
    assert engine.status("m").state == "on_disk"
    assert 'max_lora="0"' in (await http.get("/metrics")).text
    assert text(await complete(http, "m:bias", "x", max_tokens=2)) == " him him"  # reloaded


@pytest.mark.anyio
async def test_an_adapter_that_does_not_fit_the_model_fails_its_load(
        http: httpx.AsyncClient) -> None:
    reply = await http.post("/v1/completions", json={"model": "broken", "prompt": "x"})
    assert reply.status_code == 503
    message = reply.json()["error"]["message"]
    assert "LoRA adapter 'wrong'" in message and "incorrect shape" in message


@pytest.mark.anyio
async def test_an_adapter_from_the_hub_is_downloaded_with_its_model(
        registry_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(f"models:\n  h:\n    path: {registry_file.parent / 'm.gguf'}\n"
                      "    lora: [{name: bias, repo: org/bias-GGUF, file: bias.gguf}]\n")
    fetched = []

    def download(repo: str, file: str, target: Path, *_: Any, **__: Any) -> Path:
        fetched.append((repo, file, target))
        target.parent.mkdir(parents=True)
        shutil.copy(registry_file.parent / "bias.gguf", target)
        return target

    monkeypatch.setattr(hub, "download", download)
    application = create_app(Settings(models_file=models, models_dir=tmp_path / "hub",
                                      parallel=2, threads=2))
    async with application.router.lifespan_context(application), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=application), base_url="http://t") as client:
        assert text(await complete(client, "h:bias", "x", max_tokens=2)) == " him him"
    assert fetched == [("org/bias-GGUF", "bias.gguf",
                        tmp_path / "hub" / "org--bias-GGUF" / "bias.gguf")]


def test_turns_rotate_among_groups_with_work() -> None:
    turns = Turns(length=2)
    assert [turns.next({None}) for _ in range(3)] == [None] * 3  # alone: no turn limit
    # others waiting: the current group (long past its turn) gives way at once, then each
    # group has 2 steps, in a fixed order (base first, then by name)
    seen = [turns.next({None, "b", "a"}) for _ in range(7)]
    assert seen == ["a", "a", "b", "b", None, None, "a"]
    assert turns.next({"b"}) == "b"  # the current group ran out of work
    assert [turns.next({None, "b"}) for _ in range(2)] == ["b", None]
    assert turns.next(set()) is None  # nothing to do: no switch
    assert TURN_STEPS >= 1


def lora_sample(metrics: Metrics, name: str) -> dict[str, str]:
    [family] = [f for f in metrics.registry.collect() if f.name == name]
    [sample] = family.samples
    return dict(sample.labels)


def test_lora_requests_info_names_the_adapters_in_use() -> None:
    metrics = Metrics(vllm_names=True)
    empty = {"max_lora": "0", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    assert lora_sample(metrics, "vllm:lora_requests_info") == empty
    SchedulerMetrics(metrics, "a").report_adapters(2, ["sql", None, "sql"], ["fr"])
    SchedulerMetrics(metrics, "b").report_adapters(1, [], ["x"])
    SchedulerMetrics(metrics, "c").report_adapters(0, [], [])  # no adapters: not counted
    expected = {"max_lora": "3", "running_lora_adapters": "a:sql",
                "waiting_lora_adapters": "a:fr,b:x"}
    for name in ("vllm:lora_requests_info", "ggserve:lora_requests_info"):
        assert lora_sample(metrics, name) == expected
    metrics.forget("a")
    assert lora_sample(metrics, "ggserve:lora_requests_info")["max_lora"] == "1"
