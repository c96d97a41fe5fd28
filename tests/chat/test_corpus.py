"""Every real template in tests/data/chat_templates renders as transformers renders it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from server.chat.template import Segment, render_chat
from server.errors import PromptRenderError

chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")

TEMPLATES = sorted((Path(__file__).parent.parent / "data" / "chat_templates").glob("*.jinja"))
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather <b>now</b> in a city's centre",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}}]
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}}
SPECIAL = ("<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|start_header_id|>")
CONVERSATIONS: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = {
    "plain": ([{"role": "user", "content": "What is 2+2?"}], None),
    "system": ([{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Hi & <bye>"}], None),
    "multi-turn": ([{"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello! How can I help?"},
                    {"role": "user", "content": "Say 'x'."}], None),
    "tool call and result": ([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather",
         "content": '{"temp": 21}'}], TOOLS),
    "reasoning": ([{"role": "user", "content": "2+2?"},
                   {"role": "assistant", "content": "4",
                    "reasoning_content": "Two plus two is four."},
                   {"role": "user", "content": "And 3+3?"}], None),
}


def test_the_corpus_is_there() -> None:
    assert len(TEMPLATES) == 70


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_renders_as_transformers_does(path: Path, conversation: str) -> None:
    source = path.read_text()
    messages, tools = CONVERSATIONS[conversation]
    options = {"bos_token": "<s>", "eos_token": "</s>", "add_generation_prompt": True}
    try:
        # What tokenizer.apply_chat_template does: drop None-valued keys, then render.
        normalized = chat_template_utils._normalize_chat_messages(copy.deepcopy(messages))
        rendered, _ = chat_template_utils.render_jinja_template(
            conversations=[normalized], tools=copy.deepcopy(tools), chat_template=source,
            **options)
        expected: str | None = rendered[0]
    except Exception:  # the template refuses this conversation in transformers too
        expected = None
    extra = {"tools": tools} if tools else None
    if expected is None:
        with pytest.raises(PromptRenderError):
            render_chat(source, messages, extra=extra, **options)
    else:
        # With special-token texts known (none in these messages): one special segment.
        prompt = render_chat(source, messages, extra=extra, special_tokens=SPECIAL, **options)
        assert prompt == ((Segment(expected, special=True),) if expected else ())
