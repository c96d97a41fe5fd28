"""Chat prompts: sandboxed Jinja rendering into text segments that keep user text unparsed.

Every template is rendered in Jinja's ImmutableSandboxedEnvironment, including those read from
a GGUF's metadata: such a template is untrusted input (CVE-2024-34359 ran code through an
unsandboxed render in llama-cpp-python).

Message contents are wrapped in marker characters before rendering; the rendered text is then
split so that the template's own text (role headers, special tokens) is tokenized with special
tokens parsed, while message text never is: a user cannot inject `<|im_end|>` or `<end_message>`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.errors import PromptRenderError

# Unicode noncharacters: never valid in interchange text, so a marker in a rendered prompt can
# only have come from us (they are also removed from the messages before rendering).
_OPEN, _CLOSE = "\ufdd0", "\ufdd1"


@dataclass(frozen=True)
class Segment:
    """A piece of prompt text; `special` says whether special-token text in it is parsed."""

    text: str
    special: bool


Prompt = tuple[Segment, ...]


def plain_prompt(text: str) -> Prompt:
    """A raw completion prompt: the caller owns the whole format, special tokens included."""
    return (Segment(text, special=True),)


def prompt_text(prompt: Prompt) -> str:
    return "".join(segment.text for segment in prompt)


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=64)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _wrap(message: Mapping[str, Any]) -> dict[str, Any]:
    wrapped = dict(message)
    content = wrapped.get("content")
    if isinstance(content, str):
        clean = content.replace(_OPEN, "").replace(_CLOSE, "")
        wrapped["content"] = f"{_OPEN}{clean}{_CLOSE}"
    return wrapped


def _split(rendered: str) -> Prompt:
    segments: list[Segment] = []
    rest = rendered
    while rest:
        start = rest.find(_OPEN)
        if start < 0:
            segments.append(Segment(rest, special=True))
            break
        end = rest.find(_CLOSE, start)
        if end < 0:  # a template that cut the content: keep its text, never parse it
            segments.append(Segment(rest[:start], special=True))
            segments.append(Segment(rest[start + 1:].replace(_CLOSE, ""), special=False))
            break
        if start:
            segments.append(Segment(rest[:start], special=True))
        segments.append(Segment(rest[start + 1:end], special=False))
        rest = rest[end + 1:]
    return tuple(s for s in segments if s.text)


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    extra: Mapping[str, Any] | None = None,
) -> Prompt:
    """Render `messages` with a chat template into segments; PromptRenderError if it fails."""
    try:
        rendered = _compile(template).render(
            messages=[_wrap(m) for m in messages],
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
            **(extra or {}),
        )
    except jinja2.TemplateError as exc:
        raise PromptRenderError(f"The model's chat template rejected the messages: {exc}",
                                param="messages") from exc
    return _split(rendered)
