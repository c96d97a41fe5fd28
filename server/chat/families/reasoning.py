"""Reasoning formats: splitting a model's rationale from its answer, also mid-stream.

Two kinds: tags (`<think>…</think>`: Qwen3, QwQ, DeepSeek-R1; `[THINK]…[/THINK]`: Magistral,
Ministral), detected from the chat template; and a separator (Memphis-CoT's `### Answer:`),
named in models.yaml, whose prompt ends where the rationale begins. A tag format's rationale
opens with its tag, unless the prompt already opened it (DeepSeek-R1's templates end in
`<think>\\n`). Returned as `reasoning_content` and `content`, as DeepSeek's API and llama-server do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from server.engine.textstream import partial_suffix

Part = tuple[Literal["reasoning_content", "content"], str]


@dataclass(frozen=True)
class Reasoning:
    """A rationale ends at `close`; it starts at `open`, or at once when `open` is None."""

    close: str
    open: str | None = None


TAGS: tuple[tuple[str, str], ...] = (("<think>", "</think>"), ("[THINK]", "[/THINK]"))


def reasoning_for(template: str | None, prompt: Sequence[object],
                  separator: str | None) -> Reasoning | None:
    """The reasoning format of a model: its registry separator, else its template's tags (open
    already when the rendered `prompt`, its segments' text, ends inside them)."""
    if separator:
        return Reasoning(separator)
    text = "".join(getattr(segment, "text", "") for segment in prompt)
    for open_tag, close_tag in TAGS:
        if template is not None and close_tag in template:
            opened = text.rstrip().endswith(open_tag)
            return Reasoning(close_tag, None if opened else open_tag)
    return None


class ReasoningSplitter:
    """Feed output text in pieces; get back labelled parts, the tags or separator never among
    them. Whitespace between the rationale and the answer is dropped."""

    def __init__(self, reasoning: Reasoning) -> None:
        self._format = reasoning
        self._pending = ""
        self._state: Literal["start", "reasoning", "gap", "answer"] = \
            "start" if reasoning.open else "reasoning"

    def feed(self, text: str) -> list[Part]:
        self._pending += text
        if self._state == "start":
            self._opening()
        if self._state == "reasoning":
            return self._reasoning()
        return self._answer()

    def flush(self) -> list[Part]:
        out, self._pending = self._pending, ""
        kind: Literal["reasoning_content", "content"] = \
            "reasoning_content" if self._state == "reasoning" else "content"
        return [(kind, out)] if out else []

    def _opening(self) -> None:
        """A rationale must open the reply; until the tag is whole or ruled out, hold back."""
        assert self._format.open is not None
        stripped = self._pending.lstrip()
        if stripped.startswith(self._format.open):
            self._pending = stripped[len(self._format.open):]
            self._state = "reasoning"
        elif not self._format.open.startswith(stripped):
            self._state = "answer"

    def _reasoning(self) -> list[Part]:
        at = self._pending.find(self._format.close)
        if at < 0:
            keep = partial_suffix(self._pending, self._format.close)
            cut = len(self._pending) - keep
            out, self._pending = self._pending[:cut], self._pending[cut:]
            return [("reasoning_content", out)] if out else []
        before = self._pending[:at]
        self._pending = self._pending[at + len(self._format.close):]
        self._state = "gap"
        return [("reasoning_content", before), *self._answer()] if before else self._answer()

    def _answer(self) -> list[Part]:
        if self._state == "gap":
            self._pending = self._pending.lstrip()
            if not self._pending:
                return []
            self._state = "answer"
        if self._state != "answer":
            return []
        out, self._pending = self._pending, ""
        return [("content", out)] if out else []
