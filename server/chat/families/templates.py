"""What a chat template's source says about tools."""

from __future__ import annotations

import re

_JINJA_CODE = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.DOTALL)
_STRING_LITERAL = re.compile(r"'[^']*'|\"[^\"]*\"")
_TOOLS_VARIABLE = re.compile(r"(?<![\w.])tools\b")


def template_handles_tools(template_source: str) -> bool:
    """Whether a Jinja chat template reads the `tools` variable (so renders tools itself)."""
    return any(_TOOLS_VARIABLE.search(_STRING_LITERAL.sub("", code))
               for code in _JINJA_CODE.findall(template_source))
