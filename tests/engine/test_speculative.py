"""Speculative decoding's pure parts, without llama.cpp: prompt lookup, the acceptance rule,
draft planning within the batch, and the registry fields."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from server.engine.llama.batch import passes, plan_batch
from server.engine.llama.speculative import (
    PromptLookup,
    SpecState,
    Speculation,
    Speculator,
    accept,
)
from server.errors import RegistryError
from server.metrics import Metrics
from server.registry import Registry, SpeculativeSpec

END = 2


def lookup(tokens: list[int], **spec: int) -> PromptLookup:
    index = PromptLookup(SpeculativeSpec(ngram=True, **spec))
    index.extend(tokens)
    return index


def test_lookup_proposes_what_followed_the_latest_earlier_occurrence() -> None:
    #                 0  1  2  3  4  5  6  7  8  9 10 11
    index = lookup([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 2, 3], ngram_min=2, ngram_max=3)
    assert index.propose(3) == [7, 8, 2]  # (2, 3) last ended at 7: the latest, not the first
    assert index.propose(1) == [7]


def test_lookup_prefers_the_longest_match() -> None:
    #                 0  1  2  3  4  5  6  7  8  9
    index = lookup([5, 2, 3, 4, 6, 2, 3, 9, 5, 2, 3], ngram_min=2, ngram_max=3)
    assert index.propose(2) == [4, 6]  # (5, 2, 3) beats the later (2, 3) -> 9
    assert lookup([1, 2, 3, 4], ngram_min=2, ngram_max=4).propose(4) == []  # no repeat


def test_lookup_grown_step_by_step_equals_one_built_at_once() -> None:
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3]
    grown = lookup(tokens[:5])
    for k in range(5, len(tokens)):
        grown.extend(tokens[k:k + 1])
        assert grown.propose(8) == lookup(tokens[:k + 1]).propose(8)


class Sampler:
    """Answers each row with a scripted token and records which rows were sampled."""

    def __init__(self, answers: list[int]) -> None:
        self.answers = answers
        self.rows: list[int] = []

    def sample(self, _ctx: Any, row: int) -> int:
        self.rows.append(row)
        return self.answers[len(self.rows) - 1]


@pytest.mark.parametrize(("draft", "answers", "emitted"), [
    ([7, 8, 9], [7, 8, 9, 4], [7, 8, 9, 4]),  # all accepted, and the token after the last
    ([7, 8, 9], [7, 5, 0, 0], [7, 5]),  # the first disagreement is the model's token
    ([7, 8, 9], [6, 0, 0, 0], [6]),  # nothing accepted: one token, as without a draft
    ([7, END, 9], [7, END, 0, 0], [7, END]),  # nothing is sampled past an end token
    ([], [4], [4]),
])
def test_drafts_are_accepted_while_the_model_samples_them(
        draft: list[int], answers: list[int], emitted: list[int]) -> None:
    sampler = Sampler(answers)
    assert accept(sampler, None, 10, draft, lambda t: t == END) == emitted  # type: ignore[arg-type]
    assert sampler.rows == list(range(10, 10 + len(emitted)))  # one chain call per token


def test_drafts_add_rows_to_their_sequence_in_the_plan() -> None:
    entries = plan_batch([(0, 1), (1, 0)], [(0, 2, 100)], capacity=32, drafted={0: 5})
    assert [(e.seq_id, e.size, e.prefill) for e in entries] == [
        (0, 1, False), (1, 6, False), (2, 25, True)]
    # seq 1's drafts take a second pass beside seq 0's single row
    assert passes(entries[:2], 512) == 2


def choice(seq_id: int, prompt: list[int], fed: list[int], next_token: int,
           max_new: int = 100, spec: SpeculativeSpec | None = None) -> Any:
    spec = spec or SpeculativeSpec(ngram=True)
    job = SimpleNamespace(tokens=prompt, max_new=max_new, stop_tokens=frozenset({END}))
    return SimpleNamespace(seq_id=seq_id, job=job, fed=fed, next_token=next_token,
                           generated=len(fed) + 1, pos=len(prompt) + len(fed),
                           spec=SpecState(PromptLookup(spec), window=spec.draft_max))


def speculator(**fields: Any) -> Speculator:
    model: Any = SimpleNamespace(is_eog=lambda t: t == END)
    config: Any = SimpleNamespace(n_ctx=64)
    return Speculator(model, Speculation(SpeculativeSpec(ngram=True, **fields)), config,
                      Metrics(), "m")


def test_planned_drafts_fit_the_room_and_stop_at_an_end_token() -> None:
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13, END, 5, 6]
    a = choice(0, prompt, [], 7)  # ends with (5, 6, 7): drafts 8, 9, ... up to the END
    # b emitted its next token already and may emit 3 more: 2 drafts and the model's token
    b = choice(1, [1, 2, 3, 1, 2], [], 3, max_new=4)
    sizes = speculator().plan([a, b], capacity=64, prefilling=False)
    assert a.spec.draft == [8, 9, 10, 11, 12, 13, END] and b.spec.draft == [1, 2]
    assert sizes == {0: 7, 1: 2}
    # 10 rows: 2 decode rows leave 8; with a prompt being read, half of that
    sizes = speculator().plan([choice(0, prompt, [], 7), choice(1, [1, 2, 3, 1, 2], [], 3)],
                              capacity=10, prefilling=True)
    assert sizes == {0: 4}


def test_the_draft_window_doubles_while_drafts_hold_and_shrinks_when_they_fail() -> None:
    state = SpecState(None, window=4)
    for count, drafted, window in [(4, 4, 8), (8, 8, 16), (16, 16, 16), (3, 16, 4), (0, 4, 1),
                                   (1, 1, 2)]:
        state.accepted(count, drafted, longest=16)
        assert state.window == window
    many = choice(0, [1, 2, 3, 1, 2], [], 3)
    many.spec.window = 2
    speculator().plan([many], 64, False)
    assert many.spec.draft == [1, 2]  # the window, not draft_max, bounds the draft


def test_no_drafts_beyond_max_sequences_or_below_draft_min() -> None:
    many = [choice(k, [1, 2, 3, 1, 2], [], 3) for k in range(3)]
    assert speculator(max_sequences=2).plan(many, 64, False) == {}
    short = choice(0, [1, 2, 3, 1, 2], [], 3)  # its lookup finds 3 tokens: [1, 2, 3]
    assert speculator(draft_min=4).plan([short], 64, False) == {}
    assert short.spec.draft == []


def registry(tmp_path: Path, entries: str) -> Registry:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    path = tmp_path / "models.yaml"
    path.write_text("models:\n" + entries)
    return Registry.load(path, tmp_path, tmp_path)


def test_registry_names_a_draft_model_of_its_own(tmp_path: Path) -> None:
    reg = registry(tmp_path, "  big: {path: m.gguf, draft: small}\n  small: {path: m.gguf}\n")
    assert reg.get("big").draft == "small" and reg.get("big").speculative is None
    quants = "{repo: o/s, file: 's.{quant}.gguf', quant: Q4_0, quants: [Q4_0, Q8_0]}"
    registry(tmp_path, f"  big: {{path: m.gguf, draft: 'small:Q8_0'}}\n  small: {quants}\n")
    with pytest.raises(RegistryError, match="'draft': 'nope' is not a generating model"):
        registry(tmp_path, "  big: {path: m.gguf, draft: nope}\n")
    with pytest.raises(RegistryError, match="set 'ngram: true' or name a 'draft'"):
        registry(tmp_path, "  big: {path: m.gguf, speculative: {draft_max: 4}}\n")
    with pytest.raises(RegistryError, match="ngram_min' is larger"):
        registry(tmp_path, "  big: {path: m.gguf, speculative: {ngram: true, ngram_min: 5}}\n")
    with pytest.raises(RegistryError, match=r"unknown key 'speculative\.n_max'"):
        registry(tmp_path, "  big: {path: m.gguf, speculative: {ngram: true, n_max: 5}}\n")
