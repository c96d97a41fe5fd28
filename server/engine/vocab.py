"""A loaded model's vocabulary as the tokenizer endpoints see it: its special tokens, token ids
back to text. Reads only the vocabulary, which llama.cpp lets any thread use."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import llama_cpp as lc

from server.engine.base import TokenizerInfo
from server.engine.native import NativeModel
from server.errors import UnknownToken
from server.prompts import Prompt

# llama_vocab_type
_VOCAB_TYPES = {0: "none", 1: "spm", 2: "bpe", 3: "wpm", 4: "ugm", 5: "rwkv", 6: "plamo2"}


def tokenizer_info(model: NativeModel) -> TokenizerInfo:
    def text(token: int | None) -> str | None:
        return model.token_text(token) if token is not None and 0 <= token < model.n_vocab \
            else None

    unk = model.meta("tokenizer.ggml.unknown_token_id")
    return TokenizerInfo(
        vocab_type=_VOCAB_TYPES.get(int(lc.llama_vocab_type(model.vocab)), "unknown"),
        bos_token=text(model.bos), eos_token=text(model.eos),
        pad_token=text(int(lc.llama_vocab_pad(model.vocab))),  # -1: none
        unk_token=text(int(unk)) if unk and unk.lstrip("-").isdigit() else None,
        add_bos=model.add_bos)


def read_prompt(model: NativeModel, prompt: Prompt,
                add_bos: bool = True) -> tuple[list[int], bool]:
    """The tokens the model reads for `prompt` (special-token text parsed only in the
    template's segments), after a BOS if `add_bos`, the vocabulary wants one and the prompt
    does not start with it; and whether that BOS was added."""
    tokens: list[int] = []
    for segment in prompt:
        tokens += model.tokenize(segment.text, parse_special=segment.special)
    if add_bos and model.add_bos and model.bos >= 0 and tokens[:1] != [model.bos]:
        return [model.bos, *tokens], True
    return tokens, False


def check_tokens(model: NativeModel, tokens: Sequence[int], param: str) -> None:
    """UnknownToken for the first id outside the vocabulary."""
    for token in tokens:
        if not 0 <= token < model.n_vocab:
            raise UnknownToken(token, model.n_vocab, param=param)


def detokenize(model: NativeModel, tokens: Sequence[int]) -> str:
    """The text of `tokens` as a HF tokenizer decodes it: special tokens as their text."""
    check_tokens(model, tokens, "tokens")
    ids = (lc.llama_token * len(tokens))(*tokens)
    size = 16 * len(tokens) + 16
    while True:
        buf = ctypes.create_string_buffer(size)
        n = lc.llama_detokenize(model.vocab, ids, len(tokens), buf, size, False, True)
        if n >= 0:
            return buf.raw[:n].decode("utf-8", errors="replace")
        size = -n


def token_texts(model: NativeModel, tokens: Sequence[int]) -> list[str]:
    """Each token's text in the vocabulary (e.g. "Ġworld", "▁world", "<|im_end|>")."""
    check_tokens(model, tokens, "tokens")
    return [model.token_text(token) for token in tokens]
