"""What a tool-call family is: one table entry per format a model was trained to call in."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from server.chat.calls import CallSyntax, new_call_id

Functions = Sequence[tuple[str, dict[str, Any]]]  # (name, parameters schema)
GrammarBuilder = Callable[[Functions, bool], str]  # (functions, parallel) → GBNF


@dataclass(frozen=True)
class Family:
    """How one family's models call functions."""

    name: str
    detect: Callable[[str], bool]  # from the chat template's source, as llama.cpp detects it
    syntax: CallSyntax  # what the streaming parser looks for
    grammar: GrammarBuilder  # the calls allowed, for `required`/named (and `auto` once triggered)
    # `auto`: llama.cpp searches all output so far for this regex and applies the grammar from
    # its group 1 (or the whole match), so prose before a call stays free.
    trigger: str
    make_id: Callable[[], str] = new_call_id
    # Control tokens of the call syntax: llama.cpp's output drops control tokens' text unless
    # told to keep it (its `preserved_tokens`); the grammar and the trigger see their text.
    preserved: tuple[str, ...] = ()
