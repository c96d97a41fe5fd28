"""Splitting a reasoning format's output into the rationale and the answer, also mid-stream.

The prompt of such a format ends where the rationale begins (Memphis-CoT: `### Rationale:\\n`),
so the output is `{rationale}{separator}{answer}`. Returned as `reasoning_content` and `content`,
the way DeepSeek's API and llama-server do.
"""

from __future__ import annotations

from typing import Literal

from server.engine.textstream import partial_suffix

Part = tuple[Literal["reasoning_content", "content"], str]


class ReasoningSplitter:
    """Feed output text in pieces; get back labelled parts, the separator never among them."""

    def __init__(self, separator: str) -> None:
        self._separator = separator
        self._pending = ""
        self._in_answer = False

    def feed(self, text: str) -> list[Part]:
        if self._in_answer:
            return [("content", text)] if text else []
        self._pending += text
        at = self._pending.find(self._separator)
        if at >= 0:
            self._in_answer = True
            before, after = self._pending[:at], self._pending[at + len(self._separator):]
            self._pending = ""
            return [p for p in (("reasoning_content", before), ("content", after)) if p[1]]
        keep = partial_suffix(self._pending, self._separator)
        out, self._pending = self._pending[:len(self._pending) - keep], self._pending[
            len(self._pending) - keep:]
        return [("reasoning_content", out)] if out else []

    def flush(self) -> list[Part]:
        out, self._pending = self._pending, ""
        return [("reasoning_content", out)] if out else []
