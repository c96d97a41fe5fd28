"""Chat prompts: templates rendered as transformers' `apply_chat_template` renders them, in
Jinja's sandbox, within a time and size budget, into segments that keep client text unparsed.

Every template runs in the sandbox (sandbox.py), including those read from a GGUF's metadata:
such a template is untrusted input (CVE-2024-34359 ran code through an unsandboxed render in
llama-cpp-python). Templates see the client's data as transformers passes it (None-valued
message keys dropped, reasoning under `reasoning_content` and `thinking`, `tools` and
`documents` always defined), except that special-token text in it is shielded (shield.py).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import jinja2
from typing_extensions import Unpack

from server.chat.deadline import DeadlineExceeded, call_with_deadline
from server.chat.sandbox import ChatSandbox, SizeLimitExceeded, sized_items
from server.chat.shield import BrokenPlaceholder, Shield
from server.errors import PromptRenderError

RENDER_SECONDS = 2.0  # a real template renders in milliseconds
TEMPLATE_NAME = "The model's chat template"  # how errors name it unless told
# Names a message's reasoning may come under; templates read the first (and gpt-oss `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


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


@functools.lru_cache(maxsize=64)
def _compile(source: str) -> jinja2.Template:
    return ChatSandbox().from_string(source)


def _template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as transformers hands them to a template (`_normalize_chat_messages`,
    `_alias_reasoning_fields`)."""
    out = []
    for message in messages:
        message = {key: value for key, value in message.items() if value is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _render(template: str, variables: dict[str, Any], shield: Shield) -> Prompt:
    chunks = sized_items(_compile(template).generate(**variables))
    return tuple(Segment(text, special) for text, special in shield.split("".join(chunks)))


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    extra: Mapping[str, Any] | None = None,
    special_tokens: Sequence[str] = (),
    template_name: str = TEMPLATE_NAME,
    seconds: float = RENDER_SECONDS,
) -> Prompt:
    """Render `messages` (and `extra`: tools, documents, template kwargs, all client data)
    into segments; PromptRenderError if the template fails or exceeds its budgets."""
    shield = Shield(special_tokens)
    kwargs = dict(shield.data(dict(extra or {})))
    variables = {
        "messages": shield.data(_template_messages(messages)),
        "tools": kwargs.pop("tools", None),
        "documents": kwargs.pop("documents", None),
        "add_generation_prompt": add_generation_prompt,
        **{"bos_token": bos_token, "eos_token": eos_token, **kwargs},
    }
    try:
        return call_with_deadline(lambda: _render(template, variables, shield), seconds)
    except DeadlineExceeded:
        raise _too_slow(template_name, seconds) from None
    except SizeLimitExceeded as exc:
        raise PromptRenderError(f"{template_name} was stopped: {exc}", param="messages") from exc
    except (jinja2.TemplateError, BrokenPlaceholder) as exc:
        raise PromptRenderError(f"{template_name} rejected the messages: {exc}",
                                param="messages") from exc
    except Exception as exc:  # a template's own bug (a TypeError, ...) is still the request's
        raise PromptRenderError(f"{template_name} failed on the messages: "
                                f"{type(exc).__name__}: {exc}", param="messages") from exc


class RenderOptions(TypedDict, total=False):
    """render_chat's keyword options, for render_chat_async to pass on."""

    bos_token: str
    eos_token: str
    add_generation_prompt: bool
    extra: Mapping[str, Any] | None
    special_tokens: Sequence[str]
    template_name: str
    seconds: float


async def render_chat_async(template: str, messages: Sequence[Mapping[str, Any]],
                            **options: Unpack[RenderOptions]) -> Prompt:
    """render_chat in a worker thread, so that a slow template never stalls the event loop."""
    seconds = options.get("seconds", RENDER_SECONDS)
    render = functools.partial(render_chat, template, messages, **options)
    try:
        # The margin covers a C call that the deadline has to wait out; the thread finishes
        # it alone after we answer.
        return await asyncio.wait_for(asyncio.to_thread(render), seconds + 1.0)
    except TimeoutError:
        raise _too_slow(options.get("template_name", TEMPLATE_NAME), seconds) from None


def _too_slow(template_name: str, seconds: float) -> PromptRenderError:
    return PromptRenderError(f"{template_name} took longer than {seconds:g} s to render and "
                             "was stopped", param="messages")
