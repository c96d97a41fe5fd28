"""A loaded model's vocabulary as the tokenizer endpoints see it: its special tokens, token ids
back to text, and the tokens a prompt reads. Reads only the vocabulary, which llama.cpp lets
any thread use."""

from __future__ import annotations

import bisect
import ctypes
import sys
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import llama_cpp as lc

from server.chat.template import Prompt
from server.engine.base import InfillTokens, TokenizerInfo
from server.engine.llama.native import NativeModel
from server.errors import UnknownToken

# llama_vocab_type
_VOCAB_TYPES = {0: "none", 1: "spm", 2: "bpe", 3: "wpm", 4: "ugm", 5: "rwkv", 6: "plamo2"}
# llama_token_attr: llama.cpp splits these tokens out of text before its tokenizer runs;
# CONTROL and UNKNOWN only when it parses special tokens, USER_DEFINED always.
_PARSED = lc.LLAMA_TOKEN_ATTR_CONTROL | lc.LLAMA_TOKEN_ATTR_UNKNOWN
_SPECIAL = _PARSED | lc.LLAMA_TOKEN_ATTR_USER_DEFINED
_LSTRIP, _RSTRIP = lc.LLAMA_TOKEN_ATTR_LSTRIP, lc.LLAMA_TOKEN_ATTR_RSTRIP
_C_SPACE = " \t\n\v\f\r"  # C's isspace, which LSTRIP/RSTRIP use

Fragment = tuple[int, int] | int  # a raw span (start, end) of the prompt text, or a token id


@dataclass(frozen=True)
class _SpecialToken:
    id: int
    text: str
    attr: int

    @property
    def parsed(self) -> bool:
        return bool(self.attr & _PARSED)


_cache: weakref.WeakKeyDictionary[NativeModel, tuple[_SpecialToken, ...]] = \
    weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def _special_tokens(model: NativeModel) -> tuple[_SpecialToken, ...]:
    """The tokens llama.cpp splits out of text, in its order (longest text first)."""
    with _cache_lock:
        cached = _cache.get(model)
    if cached is not None:
        return cached
    tokens = []
    for token in range(model.n_vocab):
        attr = int(lc.llama_vocab_get_attr(model.vocab, token))
        if attr & _SPECIAL:
            text = model.token_text(token)
            if text:  # llama.cpp would loop forever on an empty one; real vocabularies have none
                tokens.append(_SpecialToken(token, text, attr))
    # llama.cpp's std::sort leaves ties in no defined order; ours is by id.
    tokens.sort(key=lambda t: (-len(t.text.encode()), t.id))
    with _cache_lock:
        _cache[model] = result = tuple(tokens)
    return result


def special_texts(model: NativeModel) -> tuple[str, ...]:
    """The texts llama.cpp reads as one control token only when it parses special tokens
    (CONTROL and UNKNOWN tokens), longest first."""
    return tuple(dict.fromkeys(t.text for t in _special_tokens(model) if t.parsed))


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
        add_bos=model.add_bos, infill=infill_tokens(model))


def infill_tokens(model: NativeModel) -> InfillTokens | None:
    """The vocabulary's FIM tokens (llama.cpp finds them by metadata key or by their text),
    or None when it lacks a prefix, suffix or middle token."""
    v = model.vocab

    def token(found: int) -> int | None:
        return None if found == lc.LLAMA_TOKEN_NULL else found

    pre, suf, mid = (token(int(get(v))) for get in (
        lc.llama_vocab_fim_pre, lc.llama_vocab_fim_suf, lc.llama_vocab_fim_mid))
    if pre is None or suf is None or mid is None:
        return None
    return InfillTokens(pre, suf, mid, repo=token(int(lc.llama_vocab_fim_rep(v))),
                        file_sep=token(int(lc.llama_vocab_fim_sep(v))),
                        bos=model.bos if model.add_bos and model.bos >= 0 else None)


def read_prompt(model: NativeModel, prompt: Prompt,
                add_bos: bool = True) -> tuple[list[int], bool]:
    """The tokens the model reads for `prompt`: llama_tokenize's on the whole text with
    special tokens parsed, except that client text (special=False segments) never becomes a
    control token; after a BOS if `add_bos`, the vocabulary wants one and the prompt does not
    start with it; and whether that BOS was added."""
    text = "".join(segment.text for segment in prompt)
    tokens = _tokenize(model, text, _client_spans(prompt))
    if add_bos and model.add_bos and model.bos >= 0 and tokens[:1] != [model.bos]:
        return [model.bos, *tokens], True
    return tokens, False


def _client_spans(prompt: Prompt) -> list[tuple[int, int]]:
    """The (start, end) offsets of the client's text in the prompt's text, in order."""
    spans, offset = [], 0
    for segment in prompt:
        if not segment.special and segment.text:
            spans.append((offset, offset + len(segment.text)))
        offset += len(segment.text)
    return spans


def _tokenize(model: NativeModel, text: str, client: list[tuple[int, int]]) -> list[int]:
    """llama_tokenize(text) with special tokens parsed, none taking a character of `client`."""
    if not client:
        return model.tokenize(text, parse_special=True)
    # Only the special tokens that occur matter; scanning for each costs one C-speed search.
    present = [t for t in _special_tokens(model) if t.text in text]
    if not any(t.parsed and _overlaps_client(text, t.text, client) for t in present):
        return model.tokenize(text, parse_special=True)  # what llama.cpp gives is safe
    return _tokenize_partitioned(model, text, present, client)


def _tokenize_partitioned(model: NativeModel, text: str, specials: Sequence[_SpecialToken],
                          client: list[tuple[int, int]]) -> list[int]:
    """The tokens of `text` partitioned as llama.cpp partitions it (by `specials`)."""
    tokens: list[int] = []
    for fragment in _partition(text, specials, client):
        if isinstance(fragment, int):
            tokens.append(fragment)
        else:
            # Each raw fragment on its own, as llama.cpp tokenizes it (SentencePiece adds its
            # space prefix at the start and after a special token: where fragments begin).
            tokens += model.tokenize(text[fragment[0]:fragment[1]], parse_special=False)
    return tokens


def _in_client(client: list[tuple[int, int]], start: int, end: int) -> bool:
    """Whether text[start:end] shares a character with the client's text."""
    i = bisect.bisect_right(client, (start, sys.maxsize))  # the spans from start on
    return (i > 0 and client[i - 1][1] > start) or (i < len(client) and client[i][0] < end)


def _overlaps_client(text: str, needle: str, client: list[tuple[int, int]]) -> bool:
    """Whether some occurrence of `needle` in `text` (overlapping ones too) takes a client
    character."""
    match = text.find(needle)
    while match >= 0:
        if _in_client(client, match, match + len(needle)):
            return True
        match = text.find(needle, match + 1)
    return False


def _partition(text: str, specials: Sequence[_SpecialToken],
               client: list[tuple[int, int]]) -> list[Fragment]:
    """llama.cpp's tokenizer_st_partition on `text`, except that a control token never
    matches where it would take a character of the client's text."""
    fragments: list[Fragment] = [(0, len(text))] if text else []
    for special in specials:
        split: list[Fragment] = []
        for fragment in fragments:
            if isinstance(fragment, int):
                split.append(fragment)
            else:
                split += _split(text, fragment, special, client)
        fragments = split
    return fragments


def _split(text: str, span: tuple[int, int], special: _SpecialToken,
           client: list[tuple[int, int]]) -> list[Fragment]:
    """The raw span split at each occurrence of `special`, left to right."""
    start, end = span
    out: list[Fragment] = []
    search = start
    while (match := text.find(special.text, search, end)) >= 0:
        stop = match + len(special.text)
        if special.parsed and _in_client(client, match, stop):
            search = match + 1
            continue
        left = match
        if special.attr & _LSTRIP:
            while left > start and text[left - 1] in _C_SPACE:
                left -= 1
        if left > start:
            out.append((start, left))
        out.append(special.id)
        start = search = stop
        if special.attr & _RSTRIP:
            while start < end and text[start] in _C_SPACE:
                start += 1
            search = start
    if start < end:
        out.append((start, end))
    return out


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
