"""Durations as Ollama's `keep_alive` takes them: seconds, or "30s", "5m", "1h30m"; negative
means forever and 0 means at once."""

from __future__ import annotations

import re

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: float | int | str) -> float:
    """Seconds for `value`; ValueError with the accepted forms when it is none of them."""
    if isinstance(value, int | float):
        return float(value)
    text = value.strip().lower()
    try:
        return float(text)
    except ValueError:
        pass
    sign = -1.0 if text.startswith("-") else 1.0
    body = text.lstrip("+-")
    if body and _PART.sub("", body) == "":
        return sign * sum(float(n) * _UNIT[u] for n, u in _PART.findall(body))
    raise ValueError(f"not a duration: {value!r} (use seconds, or e.g. '30s', '5m', '1h30m'; "
                     "-1 keeps the model loaded, 0 unloads it after the request)")
