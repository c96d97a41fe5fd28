"""Sampling on the real llama.cpp: a grammar checks the sampled token instead of filtering the
vocabulary first, and backend (in-graph) sampling agrees with the CPU chain."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp as lc
import numpy as np
import pytest

from server.engine.base import Grammar, SamplingParams
from server.engine.devices import gpus
from server.engine.llama.buffer import BatchBuffer
from server.engine.llama.context import ContextConfig, context_params, create_context
from server.engine.llama.native import NativeModel, init_backend, repack_enabled
from server.engine.llama.sampling import SequenceSampler, parse_grammar

# A shape the small model keeps wanting to leave: every structural token is forced.
PERSON = r'''
root ::= "{\"name\": \"" [A-Za-z ]{1,20} "\", \"age\": " [0-9]{1,3} ", \"tags\": [" tags "]}"
tags ::= tag ("," tag)*
tag ::= "\"" [a-z]{1,8} "\""
'''
PROMPT = "<|im_start|>user\nDescribe a person as JSON.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module", params=[
    "cpu", pytest.param("gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not gpus(), reason="needs a CUDA build of llama.cpp and a GPU")])])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> \
        Iterator[NativeModel]:
    """The default model on the CPU; on a GPU, a random-weight Mistral-shaped model (4 of
    its 32 layers, its 32,000-token vocabulary) with every layer and the sampling offloaded."""
    init_backend()
    if request.param == "cpu":
        path = request.getfixturevalue("smollm2_path")
        loaded = NativeModel(path, n_gpu_layers=0, repack=repack_enabled("auto"))
    else:
        # Written by another process: on the GPU machine, loading a file this process wrote
        # with gguf's writer crashed in llama_model_load_from_file (not reproduced on a CPU).
        path = tmp_path_factory.mktemp("gpu") / "m.gguf"
        subprocess.run([sys.executable, "-m", "tests.gguf_factory", "--shape", "mistral-7b",
                        "--n-layer", "4", "--dtype", "q4_k_m", "--vocab-size", "32000",
                        str(path)], check=True, cwd=Path(__file__).parents[2])
        loaded = NativeModel(path, n_gpu_layers=-1, repack=False)
    yield loaded
    loaded.close()


class Context:
    """A small llama.cpp context with a numpy batch, for driving sequences by hand."""

    def __init__(self, model: NativeModel, n_seq: int = 1) -> None:
        params = context_params(ContextConfig(n_ctx=512, parallel=n_seq, batch_tokens=512,
                                              threads=2, rope={}))
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 512 * n_seq, 512, \
            512, n_seq
        self.ctx = create_context(model, params, "a test context")
        self.memory = lc.llama_get_memory(self.ctx)
        self.buffer = BatchBuffer(512, n_seq)
        self.model = model

    def decode(self) -> None:
        assert lc.llama_decode(self.ctx, self.buffer.ready()) == 0

    def generate(self, sampler: SequenceSampler, prompt: list[int], n: int) -> list[int]:
        """Greedy-or-sampled continuation of `prompt` in sequence 0."""
        lc.llama_memory_seq_rm(self.memory, 0, 0, -1)
        self.buffer.clear()
        self.buffer.add_tokens(prompt, 0, [0], "last")
        self.decode()
        out = []
        row = self.buffer.n - 1
        for pos in range(len(prompt), len(prompt) + n):
            token = sampler.sample(self.ctx, row)
            if self.model.is_eog(token):
                break
            out.append(token)
            self.buffer.clear()
            row = self.buffer.add_rows([token], [pos], [0])
            self.decode()
        return out

    def close(self) -> None:
        lc.llama_free(self.ctx)


def grammar_first(model: NativeModel, params: SamplingParams, grammar: Any) -> Any:
    """The old way: the grammar filters the whole vocabulary, then the chain picks."""

    class GrammarFirst:
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        lc.llama_sampler_chain_add(chain, grammar)
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())

        def sample(self, ctx: Any, row: int) -> int:
            return int(lc.llama_sampler_sample(self.chain, ctx, row))

    return GrammarFirst()


def text(model: NativeModel, tokens: list[int]) -> str:
    return b"".join(model.piece(t) for t in tokens).decode("utf-8", errors="replace")


def test_greedy_output_under_a_grammar_equals_filtering_the_vocabulary_first(
        model: NativeModel) -> None:
    ctx = Context(model)
    prompt = model.tokenize(PROMPT, parse_special=True)
    greedy = SamplingParams(temperature=0)
    checked = SequenceSampler(greedy, model.n_vocab, None,
                              parse_grammar(model.vocab, Grammar(PERSON)))
    ours = ctx.generate(checked, prompt, 60)
    reference = ctx.generate(
        grammar_first(model, greedy, parse_grammar(model.vocab, Grammar(PERSON))), prompt, 60)
    ctx.close()
    assert ours == reference
    assert text(model, ours).startswith('{"name": "')
    # the model wanted other tokens: the rejected ones were re-picked from the grammar's set
    assert checked.rejections > 0
    assert checked.rejections < len(ours)
    checked.close()


def test_sampled_output_under_a_grammar_stays_valid(model: NativeModel) -> None:
    ctx = Context(model)
    prompt = model.tokenize(PROMPT, parse_special=True)
    for seed in range(4):
        for top_k in (40, 0):  # the prefix path, and the full-vocabulary fall-back
            sampler = SequenceSampler(SamplingParams(temperature=1.0, top_k=top_k, top_p=0.95,
                                                     min_p=0.05, seed=seed),
                                      model.n_vocab, seed,
                                      parse_grammar(model.vocab, Grammar(PERSON)))
            out = text(model, ctx.generate(sampler, prompt, 80))
            sampler.close()
            head, _, _ = out.partition('", "age": ')
            assert head.startswith('{"name": "') and len(head) <= len('{"name": "') + 20, out
    ctx.close()


def first_token_distribution(model: NativeModel, params: SamplingParams, backend: bool,
                             rounds: int, n_seq: int = 16) -> Counter[int]:
    """The first sampled token of PROMPT over `rounds` * `n_seq` seeds."""
    ctx = Context(model, n_seq)
    prompt = model.tokenize("Once upon a time, there", parse_special=True)
    counts: Counter[int] = Counter()
    for r in range(rounds):
        samplers = [SequenceSampler(params, model.n_vocab, r * n_seq + s) for s in range(n_seq)]
        ctx.buffer.clear()
        rows = []
        for seq, sampler in enumerate(samplers):
            lc.llama_memory_seq_rm(ctx.memory, seq, 0, -1)
            if backend:
                assert sampler.attach(ctx.ctx, seq)
            first = ctx.buffer.add_tokens(prompt, 0, [seq], "last")
            rows.append(first + len(prompt) - 1)
        ctx.decode()
        for seq, (sampler, row) in enumerate(zip(samplers, rows, strict=True)):
            counts[sampler.sample(ctx.ctx, row)] += 1
            sampler.detach(ctx.ctx, seq)
            sampler.close()
    ctx.close()
    return counts


def expected_distribution(model: NativeModel, top_k: int) -> dict[int, float]:
    ctx = Context(model)
    prompt = model.tokenize("Once upon a time, there", parse_special=True)
    ctx.buffer.add_tokens(prompt, 0, [0], "last")
    ctx.decode()
    logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx.ctx, len(prompt) - 1),
                                   shape=(model.n_vocab,)).astype(np.float64)
    ctx.close()
    best = np.argsort(-logits)[:top_k]
    p = np.exp(logits[best] - logits[best].max())
    return dict(zip(best.tolist(), (p / p.sum()).tolist(), strict=True))


def test_backend_and_cpu_sampling_agree_on_greedy_output(model: NativeModel) -> None:
    greedy = SamplingParams(temperature=0)
    cpu = first_token_distribution(model, greedy, backend=False, rounds=1, n_seq=4)
    graph = first_token_distribution(model, greedy, backend=True, rounds=1, n_seq=4)
    assert cpu == graph and len(cpu) == 1


def test_backend_and_cpu_sampling_draw_from_the_same_distribution(model: NativeModel) -> None:
    params = SamplingParams(temperature=1.0, top_k=8, top_p=1.0, min_p=0.0)
    expected = expected_distribution(model, 8)
    for backend in (False, True):
        counts = first_token_distribution(model, params, backend=backend, rounds=40)
        total = sum(counts.values())
        assert set(counts) <= set(expected)
        # total variation distance to the exact top-8 softmax (640 draws: ~0.05 expected)
        tvd = 0.5 * sum(abs(counts[t] / total - p) for t, p in expected.items())
        assert tvd < 0.12, (backend, tvd, counts, expected)


def test_a_seeded_backend_draw_repeats(model: NativeModel) -> None:
    params = SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)
    first = first_token_distribution(model, params, backend=True, rounds=2)
    again = first_token_distribution(model, params, backend=True, rounds=2)
    assert first == again and len(first) > 1


# A first token the model all but never samples: the chain's choice is refused, and with
# top-k and min-p off the best-scoring candidates cannot decide what filtering every token would.
UNLIKELY = 'root ::= "zq" [a-z]{0,6}'


@pytest.mark.parametrize("repeat_penalty", [1.0, 1.3], ids=["no penalties", "penalties"])
def test_a_refusal_only_the_vocabulary_decides_is_deferred_and_resolves_as_inline(
        model: NativeModel, repeat_penalty: float) -> None:
    ctx = Context(model)
    prompt = model.tokenize(PROMPT, parse_special=True)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                            repeat_penalty=repeat_penalty)
    inline, deferred = (SequenceSampler(params, model.n_vocab, 5,
                                        parse_grammar(model.vocab, Grammar(UNLIKELY)))
                        for _ in range(2))
    ctx.buffer.add_tokens(prompt, 0, [0], "last")
    ctx.decode()
    row = len(prompt) - 1
    expected = inline.sample(ctx.ctx, row)
    assert deferred.try_sample(ctx.ctx, row) is None and deferred.rejections == 1
    # another decode overwrites the row's logits: resolve() works on its own copy of them
    ctx.buffer.clear()
    ctx.buffer.add_tokens(model.tokenize("Something else entirely", parse_special=False),
                          len(prompt), [0], "last")
    ctx.decode()
    assert deferred.resolve() == expected
    assert model.piece(expected).decode().startswith("z")
    # both grammars moved past the same token: they accept and refuse alike from here on
    for text_ in ("q", "zq", "a", "{", " "):
        token = model.tokenize(text_, parse_special=False)[0]
        assert inline._allowed(token) == deferred._allowed(token), text_
    inline.close()
    deferred.close()
    ctx.close()
