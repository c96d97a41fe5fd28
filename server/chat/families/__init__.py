"""The tool-call families: how each model family is told of tools, calls them and is parsed.

Detected from the chat template's source as llama.cpp's common_chat_templates_apply does; the
first family whose markers the template holds wins, so the more specific come first.
"""

from __future__ import annotations

from server.chat.families import hermes, llama3, mistral, qwen3_coder
from server.chat.families.base import Family
from server.chat.families.hermes import GENERIC
from server.chat.families.templates import template_handles_tools

__all__ = ["FAMILIES", "GENERIC", "Family", "detect_family", "prompt_family"]

FAMILIES: tuple[Family, ...] = (
    qwen3_coder.FAMILY,  # before hermes: its calls are inside <tool_call> too
    hermes.FAMILY,
    llama3.FAMILY,
    mistral.ARGS_FAMILY,  # before mistral: both have [TOOL_CALLS]
    mistral.FAMILY,
)


def detect_family(template: str) -> Family:
    """The family whose call format the template writes; GENERIC (Hermes-style) if none."""
    return next((family for family in FAMILIES if family.detect(template)), GENERIC)


def prompt_family(template: str | None) -> Family:
    """The family to prompt and parse in: the template's own when it renders `tools` itself;
    else GENERIC, whose format is described in the system message."""
    if template is None or not template_handles_tools(template):
        return GENERIC
    return detect_family(template)
