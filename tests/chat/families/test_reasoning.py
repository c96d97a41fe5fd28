"""Reasoning splits, whole and at every character boundary, and with tool calls after them."""

from __future__ import annotations

import pytest

from server.chat.families.reasoning import Reasoning, ReasoningSplitter
from server.chat.output import ChoiceOutput
from server.chat.tools import plan_tools

THINK = Reasoning("</think>", "<think>")


def split(reasoning: Reasoning, chunks: list[str]) -> tuple[str, str]:
    splitter = ReasoningSplitter(reasoning)
    parts = [p for chunk in chunks for p in splitter.feed(chunk)] + splitter.flush()
    kinds = [k for k, _ in parts]
    assert kinds == sorted(kinds, key=lambda k: k == "content")  # rationale first
    return ("".join(t for k, t in parts if k == "reasoning_content"),
            "".join(t for k, t in parts if k == "content"))


def every_way(reasoning: Reasoning, text: str) -> tuple[str, str]:
    whole = split(reasoning, [text])
    for i in range(1, len(text)):
        assert split(reasoning, [text[:i], text[i:]]) == whole
    assert split(reasoning, list(text)) == whole
    return whole


@pytest.mark.parametrize(("reasoning", "text", "expected"), [
    (THINK, "<think>\nTwo and two.\n</think>\n\n4.", ("\nTwo and two.\n", "4.")),
    (THINK, "\n<think>x</think>4", ("x", "4")),
    (THINK, "4, no thinking <think>", ("", "4, no thinking <think>")),
    (THINK, "<thin", ("", "<thin")),
    (THINK, "<think>cut off", ("cut off", "")),
    (Reasoning("</think>"), "Two and two.</think>4.", ("Two and two.", "4.")),
    (Reasoning("[/THINK]", "[THINK]"), "[THINK]hm[/THINK]4", ("hm", "4")),
    (Reasoning("\n### Answer:\n"), "Two plus two is four.\n### Answer:\n4",
     ("Two plus two is four.", "4")),
])
def test_splits(reasoning: Reasoning, text: str, expected: tuple[str, str]) -> None:
    assert every_way(reasoning, text) == expected


def test_reasoning_then_a_tool_call() -> None:
    tools = [{"type": "function", "function": {"name": "get_time"}}]
    plan = plan_tools(tools, "auto", None)
    text = ('<think>The time?</think>\n\n<tool_call>\n{"name": "get_time", "arguments": {}}\n'
            "</tool_call>")
    for chunks in ([text], list(text)):
        output = ChoiceOutput(THINK, plan)
        deltas = [d for c in chunks for d in output.feed(c)] + output.flush()
        assert "".join(d.get("reasoning_content", "") for d in deltas) == "The time?"
        assert not any("content" in d for d in deltas)
        assert output.calls == 1
