"""The Jinja environment chat templates run in: transformers' semantics, Jinja's sandbox, and
a size budget on every value a template builds.

transformers (`utils/chat_template_utils.py`, `_cached_compile_jinja_template`) renders with
an ImmutableSandboxedEnvironment(trim_blocks, lstrip_blocks) plus loopcontrols, a
`{% generation %}` tag, its own `tojson`, `raise_exception`, `strftime_now`, and restricted
`dict` and `namespace` globals; ours is the same, so a template renders byte for byte as it
does there. GGUF templates are untrusted input (CVE-2024-34359), hence the sandbox, and hence
the size checks: a C-level operation (`'x' * 10**9`, `s.center(10**9)`) cannot be interrupted
by the render's time budget, so every operator, call and filter that can grow a value is
checked before it runs where its size is cheap to predict, and its result after.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable, Sized
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The largest string, list or rendered prompt a template may build, in characters or items.
MAX_SIZE = 16 * 2**20
_MAX_POW_BITS = 1 << 16  # big-integer powers run in C, uninterruptibly
_MAX_JSON_INDENT = 1024
# %-format widths and precisions, and str.format field widths
_PERCENT_WIDTHS = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\d*|\*)(?:\.(\d*|\*))?")
_FORMAT_WIDTHS = re.compile(r"\{[^{}]*?:[^{}]*?(\d+)")
# Our placeholders' noncharacters, which json.dumps(ensure_ascii=True) writes as escapes.
_JSON_ESCAPES = re.compile(r"\\\\|\\u(fd[de][0-9a-f])")


class SizeLimitExceeded(jinja2.TemplateError):
    """A template built a value larger than MAX_SIZE."""


def check_size(size: int) -> None:
    if size > MAX_SIZE:
        raise SizeLimitExceeded(f"the template built a value of {size} characters or items "
                                f"(at most {MAX_SIZE} allowed)")


def _checked(value: Any) -> Any:
    if isinstance(value, Sized) and not isinstance(value, range):
        check_size(len(value))
    return value


def _str_size(value: Any) -> int:
    return len(value) if isinstance(value, str) else len(str(value))


def _predict_str_method(name: str, text: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Refuse a str method whose result would be too large, before it allocates it; returns
    `args` (an iterable to join comes back as a list, since sizing it consumed it)."""
    if name == "join" and args:
        items = list(args[0])
        check_size(sum(_str_size(i) for i in items) + len(text) * len(items))
        return (items, *args[1:])
    if name in ("center", "ljust", "rjust", "zfill"):
        for width in args[:1]:
            if isinstance(width, int):
                check_size(width)
    elif name == "replace" and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        count = len(text) + 1 if not old else text.count(old)
        check_size(len(text) + count * len(new))
    elif name == "expandtabs" and args and isinstance(args[0], int):
        check_size(len(text) + text.count("\t") * args[0])
    return args


def _check_percent_format(template: str, values: Any) -> None:
    numbers = [int(n) for match in _PERCENT_WIDTHS.findall(template) for n in match if
               n.isdigit()]
    if any("*" in match for match in _PERCENT_WIDTHS.findall(template)):
        items = values if isinstance(values, tuple) else (values,)
        numbers += [abs(v) for v in items if isinstance(v, int)]
    check_size(len(template) + max(numbers, default=0))


def _multiply(left: Any, right: Any) -> Any:
    for seq, times in ((left, right), (right, left)):
        if isinstance(seq, str | list | tuple) and isinstance(times, int):
            check_size(len(seq) * times)
    return left * right


def _power(left: Any, right: Any) -> Any:
    if isinstance(left, int) and isinstance(right, int) and \
            right * max(abs(left).bit_length(), 1) > _MAX_POW_BITS:
        raise SizeLimitExceeded(f"the template computed {left} ** {right}, too large a number")
    return left**right


def _modulo(left: Any, right: Any) -> Any:
    if isinstance(left, str):
        _check_percent_format(left, right)
    return left % right


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _unescape_placeholders(match: re.Match[str]) -> str:
    return chr(int(match[1], 16)) if match[1] else match[0]


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' tojson: key order kept, nothing HTML-escaped, json.dumps' options."""
    if (isinstance(indent, int) and indent > _MAX_JSON_INDENT) or \
            (isinstance(indent, str) and len(indent) > _MAX_JSON_INDENT):
        raise SizeLimitExceeded(f"tojson indent is at most {_MAX_JSON_INDENT}")
    text = json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)
    # Client text reaches templates with placeholders in it (see shield.py); keep them whole.
    return _JSON_ESCAPES.sub(_unescape_placeholders, text) if ensure_ascii else text


class _TemplateDict:
    """transformers' `dict` global: builds dicts, without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """transformers' `namespace`: no underscore-prefixed attributes."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                "Chat templates cannot store underscore-prefixed attributes on a namespace, "
                f"but got {name!r}. Please rename the attribute.")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}…{% endgeneration %}`: renders its body (transformers uses the span
    to mask assistant tokens in training; a prompt needs only the text)."""

    tags: set[str] = {"generation"}  # noqa: RUF012 - Jinja reads it from the class

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


class _SizedConcat(CodeGenerator):
    """Compiles `a ~ b` so that its result is size-checked like every other operation."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.checked(")
        super().visit_Concat(node, frame)
        self.write(")")


def _sized_filter(name: str, filter_: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(filter_)
    def run(*args: Any, **kwargs: Any) -> Any:
        # A filter that takes an eval context or context gets it first; then its input value.
        first = 1 if args and isinstance(args[0], nodes.EvalContext | Context) else 0
        if len(args) > first:
            value, params = args[first], args[first + 1:]
            if name == "join":
                value = _predict_str_method("join", str(params[0]) if params else "",
                                            (value,))[0]
                args = (*args[:first], value, *params)
            elif name == "replace":
                _predict_str_method("replace", str(value), params)
            elif name == "indent" and params:
                width = params[0]
                lines = str(value).count("\n") + 1
                check_size(_str_size(value) + lines * (
                    width if isinstance(width, int) else len(str(width))))
            elif name == "format":
                _check_percent_format(str(value), params)
            for param in (*params, *kwargs.values()):
                if isinstance(param, int) and not isinstance(param, bool):
                    check_size(abs(param))  # widths and counts: center, batch, slice, ...
        return _checked(filter_(*args, **kwargs))

    return run


class ChatSandbox(ImmutableSandboxedEnvironment):
    """transformers' chat-template environment, with sizes checked."""

    code_generator_class = _SizedConcat
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True,
                         extensions=[_GenerationTag, jinja2.ext.loopcontrols])
        self.binop_table.update({"*": _multiply, "**": _power, "%": _modulo})
        self.filters = {name: _sized_filter(name, f) for name, f in self.filters.items()}
        self.filters["tojson"] = _sized_filter("tojson", _tojson)
        self.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                            dict=_TemplateDict(), namespace=_TemplateNamespace)

    def checked(self, value: Any) -> Any:
        """`value`, if it is within the size budget."""
        return _checked(value)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        return _checked(super().call_binop(context, operator, left, right))

    def call(__self, __context: Context, __obj: Any, *args: Any,
             **kwargs: Any) -> Any:
        if isinstance(getattr(__obj, "__self__", None), str):
            args = _predict_str_method(getattr(__obj, "__name__", ""), __obj.__self__, args)
        return _checked(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            widths = [int(w) for w in _FORMAT_WIDTHS.findall(value.__self__)]
            check_size(max(widths, default=0))
        return wrapped


def sized_items(values: Iterable[str]) -> Iterable[str]:
    """`values` (a render's output chunks), stopping once they exceed MAX_SIZE in total."""
    total = 0
    for chunk in values:
        total += len(chunk)
        check_size(total)
        yield chunk
