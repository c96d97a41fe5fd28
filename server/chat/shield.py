"""Client text never becomes a special token: placeholders in, segments out.

Before rendering, every special-token text (`<|im_end|>`, `<s>`, ...) inside any client string
is replaced by a placeholder of Unicode noncharacters; after rendering, each placeholder turns
back into its text as a `special=False` segment, which the engine tokenizes as plain text.
Everything else reaches the template unchanged, so a conversation without special-token text
renders exactly as transformers renders it. Noncharacters are stripped from client strings
first (they are not valid in interchange text), so a client cannot forge a placeholder.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

_OPEN, _CLOSE = "\ufdd0", "\ufdd1"
_DIGITS = "".join(chr(c) for c in range(0xFDD2, 0xFDF0))  # 30 digits, U+FDD2..U+FDEF
_NONCHARACTERS = re.compile("[\ufdd0-\ufdef]")
_PLACEHOLDER = re.compile(f"{_OPEN}([{_DIGITS}]+){_CLOSE}")


class BrokenPlaceholder(ValueError):
    """The template cut client text inside a special token's placeholder and joined the
    pieces into that token."""


def _encode(index: int) -> str:
    digits = ""
    while True:
        index, digit = divmod(index, len(_DIGITS))
        digits = _DIGITS[digit] + digits
        if not index:
            return f"{_OPEN}{digits}{_CLOSE}"


def _decode(digits: str) -> int:
    index = 0
    for digit in digits:
        index = index * len(_DIGITS) + _DIGITS.index(digit)
    return index


class Shield:
    """Placeholders for the special-token texts `special` in client data, and back."""

    def __init__(self, special: Sequence[str]) -> None:
        self.special = tuple(sorted({t for t in special if t}, key=len, reverse=True))
        self._codes = {text: _encode(i) for i, text in enumerate(self.special)}

    def data(self, value: Any) -> Any:
        """`value` (client JSON data) as plain data with every string shielded, keys too."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {self.data(k): self.data(v) for k, v in value.items()}
        if isinstance(value, tuple):
            return tuple(self.data(v) for v in value)
        if isinstance(value, list):
            return [self.data(v) for v in value]
        return value

    def text(self, text: str) -> str:
        text = _NONCHARACTERS.sub("", str.__str__(text))
        present = [t for t in self.special if t in text]  # a C-speed scan per token
        if not present:
            return text
        return _pattern(tuple(present)).sub(lambda m: self._codes[m[0]], text)

    def split(self, rendered: str) -> list[tuple[str, bool]]:
        """Rendered text as (text, special) pieces: the template's text special, the client's
        special-token texts not."""
        segments: list[tuple[str, bool]] = []
        start = 0
        for match in _PLACEHOLDER.finditer(rendered):
            index = _decode(match[1])
            if index >= len(self.special):  # a template that rebuilt digits: drop them
                continue
            segments.append((self._clean(rendered[start:match.start()]), True))
            segments.append((self.special[index], False))
            start = match.end()
        segments.append((self._clean(rendered[start:]), True))
        return [(text, special) for text, special in segments if text]

    def _clean(self, text: str) -> str:
        """`text` without stray placeholder pieces (a template sliced or split one)."""
        pieces = _NONCHARACTERS.split(text)
        joined = "".join(pieces)
        present = [t for t in self.special if t in joined]
        offset = 0
        for piece in pieces[:-1]:
            offset += len(piece)
            # An occurrence inside this window straddles the joint: dropping the piece between
            # made it, out of client text.
            if any(joined.find(t, max(0, offset - len(t) + 1), offset + len(t) - 1) >= 0
                   for t in present):
                raise BrokenPlaceholder("the template cut a special token out of client text "
                                        "and joined its pieces")
        return joined


@functools.lru_cache(maxsize=256)
def _pattern(tokens: tuple[str, ...]) -> re.Pattern[str]:
    # Longest first, so a token wins over the tokens it contains (as llama.cpp splits them).
    return re.compile("|".join(map(re.escape, tokens)))
