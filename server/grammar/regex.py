"""JSON Schema `pattern` → the regular expressions llama.cpp's schema converter handles correctly.

The converter copies character classes into the grammar as they are, writes escapes such as `\\.`
or `\\d` into grammar literals that llama.cpp then cannot parse, and forgets that a pattern
matches the decoded string while the grammar generates its JSON text. So patterns are translated
first: escapes and shorthands become classes in GBNF notation, and the characters JSON must escape
(`"`, `\\`, control characters) are generated as escape sequences, or left out of classes and `.`
(a class may then allow fewer characters than the pattern, never more).
"""

from __future__ import annotations

import re
import string

MAX_REPEAT = 1000  # larger {m,n} bounds make grammars too big to build per request

_Ranges = list[tuple[int, int]]
# ECMAScript's \d, \w and \s (patterns are ECMA-262 regular expressions).
_SHORTHANDS: dict[str, _Ranges] = {
    "d": [(0x30, 0x39)],
    "w": [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
    "s": [(0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
          (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000),
          (0xFEFF, 0xFEFF)],
}
_CONTROL_ESCAPES = {"n": 0x0A, "t": 0x09, "r": 0x0D, "f": 0x0C, "v": 0x0B, "0": 0x00}
# Characters a JSON string holds only escaped, and their short escapes.
_JSON_UNSAFE: _Ranges = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C)]
_JSON_ESCAPES = {0x22: "[\\x22]", 0x5C: "[\\x5C]", 0x0A: "n", 0x09: "t", 0x0D: "r", 0x0C: "f",
                 0x08: "b"}
_SYNTAX = set('"\\|.()[]{}*+?^$')  # characters the converter would not take as plain literals
_LINE_BREAKS: _Ranges = [(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)]  # what `.` excludes
_QUANTIFIER = re.compile(r"\{(\d+)(?:,(\d*))?\}")


class PatternError(ValueError):
    """A pattern the grammar cannot express; the message completes "'/…/pattern' …"."""


def translate_pattern(pattern: object) -> str:
    """The converter-ready form of an anchored ECMA-262 `pattern`, matching JSON string text."""
    if not isinstance(pattern, str):
        raise PatternError("must be a string")
    trailing_backslashes = len(pattern[:-1]) - len(pattern[:-1].rstrip("\\"))
    if not (pattern.startswith("^") and pattern.endswith("$")) or trailing_backslashes % 2:
        raise PatternError("must match the whole string: start it with ^ and end it with $")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise PatternError(f"is not a valid regular expression ({exc.msg})") from None
    body, out, i = pattern[1:-1], [], 0
    while i < len(body):
        piece, i = _token(body, i)
        out.append(piece)
    return "^" + "".join(out) + "$"


def _token(body: str, i: int) -> tuple[str, int]:
    c = body[i]
    if c == "\\":
        ranges, negated, end = _escape(body, i, in_class=False)
        single = not negated and len(ranges) == 1 and ranges[0][0] == ranges[0][1]
        return (_char(ranges[0][0]) if single else _class(ranges, negated)), end
    if c == "[":
        ranges, negated, end = _bracket(body, i)
        return _class(ranges, negated), end
    if c == ".":
        return _class(_LINE_BREAKS, negated=True), i + 1
    if body.startswith("(?:", i):
        return "(", i + 3
    if body.startswith("(?", i):
        raise PatternError("uses '(?', for lookaround or named groups, which the grammar cannot "
                           "express; use plain groups")
    if c in "^$":
        raise PatternError(f"uses '{c}' inside the pattern; anchors are supported only at its ends")
    if c == "{" and (quantifier := _QUANTIFIER.match(body, i)):
        if any(int(n) > MAX_REPEAT for n in quantifier.groups() if n):
            raise PatternError(f"repeats more than {MAX_REPEAT} times")
        return quantifier[0], quantifier.end()
    if c in "|()*+?":
        return c, i + 1
    return _char(ord(c)), i + 1


def _escape(body: str, i: int, *, in_class: bool) -> tuple[_Ranges, bool, int]:
    """The characters `\\x` at body[i] stands for, whether they are negated, and the end."""
    if i + 1 >= len(body):
        raise PatternError("ends with a lone backslash")
    e = body[i + 1]
    if e.lower() in _SHORTHANDS:
        if e.isupper() and in_class:
            raise PatternError(f"uses \\{e} inside a character class, which the grammar cannot "
                               "express; list the characters instead")
        return list(_SHORTHANDS[e.lower()]), e.isupper(), i + 2
    if e in "xu":
        digits = body[i + 2:i + (4 if e == "x" else 6)]
        if len(digits) != (2 if e == "x" else 4) or not set(digits) <= set(string.hexdigits):
            raise PatternError(f"has an invalid \\{e} escape")
        code = int(digits, 16)
        return [(code, code)], False, i + 2 + len(digits)
    if e == "b" and in_class:
        code = 0x08
    elif e in _CONTROL_ESCAPES:
        code = _CONTROL_ESCAPES[e]
    elif e.isalnum():
        raise PatternError(f"uses \\{e}, which the grammar cannot express (word boundaries, "
                           "back-references and Unicode properties are not supported)")
    else:
        code = ord(e)
    return [(code, code)], False, i + 2


def _bracket(body: str, i: int) -> tuple[_Ranges, bool, int]:
    """The character class `[...]` at body[i]: its ranges, whether negated, and its end."""
    j = i + 1
    negated = body.startswith("^", j)
    j += negated
    ranges: _Ranges = []
    while j < len(body) and body[j] != "]":
        low, j = _class_atom(body, j)
        if len(low) == 1 and body.startswith("-", j) and j + 1 < len(body) and body[j + 1] != "]":
            high, j = _class_atom(body, j + 1)
            if len(high) != 1 or high[0][0] < low[0][0]:
                raise PatternError("has an invalid range in a character class")
            ranges.append((low[0][0], high[0][0]))
        else:
            ranges += low
    if j >= len(body):
        raise PatternError("has a '[' that is never closed")
    return ranges, negated, j + 1


def _class_atom(body: str, j: int) -> tuple[_Ranges, int]:
    if body[j] != "\\":
        return [(ord(body[j]), ord(body[j]))], j + 1
    ranges, _, end = _escape(body, j, in_class=True)
    return ranges, end


def _char(code: int) -> str:
    """One character as the converter reads it; JSON-escaped where a JSON string needs it."""
    if code in _JSON_ESCAPES:
        return f"([\\x5C]{_JSON_ESCAPES[code]})"
    if code < 0x20:
        return f"([\\x5C]u00{code:02X})"
    return f"[{_gbnf(code)}]" if chr(code) in _SYNTAX else chr(code)


def _class(ranges: _Ranges, negated: bool) -> str:
    ranges = _merge(ranges + _JSON_UNSAFE) if negated else _subtract(_merge(ranges), _JSON_UNSAFE)
    if not ranges and not negated:
        raise PatternError('has a character class holding only characters a JSON string must '
                           'escape (", \\ or control characters), which the grammar cannot '
                           "generate there")
    items = "".join(_gbnf(lo) if lo == hi else f"{_gbnf(lo)}-{_gbnf(hi)}" for lo, hi in ranges)
    return f"[{'^' if negated else ''}{items}]"


def _gbnf(code: int) -> str:
    if chr(code).isascii() and chr(code).isalnum():
        return chr(code)
    return f"\\x{code:02X}" if code < 0x100 else (
        f"\\u{code:04X}" if code < 0x10000 else f"\\U{code:08X}")


def _merge(ranges: _Ranges) -> _Ranges:
    merged: _Ranges = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def _subtract(ranges: _Ranges, removed: _Ranges) -> _Ranges:
    for cut_lo, cut_hi in removed:
        ranges = [piece for lo, hi in ranges
                  for piece in ((lo, min(hi, cut_lo - 1)), (max(lo, cut_hi + 1), hi))
                  if piece[0] <= piece[1]]
    return ranges
