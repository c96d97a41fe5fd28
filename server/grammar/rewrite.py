"""Which JSON Schemas a grammar can enforce: check one and rewrite it for llama.cpp's converter.

The converter drops what it cannot enforce without a word, which would let a grammar allow output
the schema forbids. Here every such keyword is a 400 that names its JSON pointer, and the rest is
rewritten into the forms the converter handles exactly: type lists and `nullable` become anyOf,
allOf of object schemas is merged, `true` and keyword-less schemas become "any value", references
are renamed uniquely, and `pattern` is translated for JSON strings. Where the grammar must
differ from the schema it allows less: properties come in a fixed order (required first) and
unlisted ones are not generated. The one exception: oneOf is generated as anyOf, so a value
matching two alternatives is not refused.
"""

from __future__ import annotations

import json
import re
from typing import Any

from server.errors import InvalidRequest
from server.grammar.regex import MAX_REPEAT, PatternError, translate_pattern

TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
ANY: dict[str, Any] = {"anyOf": [{"type": t} for t in TYPES if t != "integer"]}
# Keywords that constrain only values of one type (JSON Schema ignores them for other types).
TYPE_KEYWORDS = {
    "object": ("properties", "required", "additionalProperties"),
    "array": ("items", "prefixItems", "minItems", "maxItems"),
    "string": ("pattern", "format", "minLength", "maxLength"),
}
COMBINATORS = ("$ref", "anyOf", "oneOf", "allOf", "const", "enum")
ASSERTIONS = frozenset({"type", *COMBINATORS, *(k for ks in TYPE_KEYWORDS.values() for k in ks)})
# Assertions the converter ignores: a grammar built without them would allow invalid output.
UNSUPPORTED = frozenset({
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "not", "if",
    "then", "else", "patternProperties", "dependentRequired", "dependentSchemas", "dependencies",
    "uniqueItems", "contains", "minContains", "maxContains", "propertyNames", "minProperties",
    "maxProperties", "unevaluatedProperties", "unevaluatedItems", "additionalItems",
    "$dynamicRef", "$recursiveRef",
})
FORMATS = frozenset({"date", "time", "date-time", "uuid", *(f"uuid{n}" for n in range(1, 6))})


_COUNTS = frozenset({"minLength", "maxLength", "minItems", "maxItems"})


def enforceable(schema: Any) -> Any:
    """`schema` less the assertions a grammar cannot enforce (UNSUPPORTED keywords, formats
    other than FORMATS, length and count bounds past MAX_REPEAT, such as Claude Code's
    `"maxLength": 524288`): what a non-strict tool's arguments are held to."""
    if not isinstance(schema, dict):
        return schema
    kept: dict[str, Any] = {}
    for key, value in schema.items():
        if key in UNSUPPORTED or (key == "format" and str(value) not in FORMATS) or (
                key in _COUNTS and isinstance(value, int) and value > MAX_REPEAT):
            continue
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            value = {name: enforceable(sub) for name, sub in value.items()}
        elif isinstance(value, list) and key in ("items", "prefixItems", "anyOf", "oneOf",
                                                 "allOf"):
            value = [enforceable(sub) for sub in value]
        elif key in ("items", "additionalProperties"):
            value = enforceable(value)
        kept[key] = value
    return kept


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    return {dict: "object", list: "array", str: "string", float: "number"}.get(type(value), "null")


def _leading_refs(schema: dict[str, Any]) -> list[str]:
    """The definitions a rewritten schema may start with (through references and anyOf)."""
    if "$ref" in schema:
        return [schema["$ref"].rsplit("/", 1)[-1]]
    return [ref for branch in schema.get("anyOf", []) for ref in _leading_refs(branch)]


class SchemaRewriter:
    """One schema, checked and rewritten into the forms the converter enforces exactly.

    References become `#/$defs/<unique name>` into `defs`, so that schemas of several functions
    can share one converter without their definitions' rule names colliding.
    """

    def __init__(self, root: Any, *, param: str, context: str, prefix: str) -> None:
        self.root, self.param, self.context, self.prefix = root, param, context, prefix
        self.defs: dict[str, dict[str, Any]] = {}
        self._names: dict[str, str] = {}
        self._queue: list[str] = []

    def rewrite(self) -> dict[str, Any]:
        top = self.node(self.root, "")
        while self._queue:
            pointer = self._queue.pop()
            self.defs[self._names[pointer]] = self.node(self._lookup(pointer, "#" + pointer),
                                                        pointer)
        self._check_progress()
        return top

    def _check_progress(self) -> None:
        """Refuse definitions that reach themselves before any `{` or `[`: no finite value
        matches them, and llama.cpp refuses such (left-recursive) grammars."""
        pointers = {name: pointer for pointer, name in self._names.items()}
        for start in self.defs:
            seen, todo = set(), [start]
            while todo:
                for ref in _leading_refs(self.defs[todo.pop()]):
                    if ref == start:
                        raise self.fail(pointers[start], "refers to itself before any object or "
                                        "array, so no finite value matches it.")
                    if ref not in seen:
                        seen.add(ref)
                        todo.append(ref)

    def fail(self, pointer: str, problem: str) -> InvalidRequest:
        where = f"'{pointer}'" if pointer else "The schema root"
        return InvalidRequest(f"{where} {problem}", param=self.param)

    def node(self, schema: Any, ptr: str) -> dict[str, Any]:
        if schema is True:
            return ANY
        if not isinstance(schema, dict):
            raise self.fail(ptr, "must be a JSON Schema object" + (
                " (false allows no value at all)" if schema is False else ""))
        for key, value in schema.items():
            if key in UNSUPPORTED and not (key == "uniqueItems" and value is False):
                raise self.fail(f"{ptr}/{_escape(key)}", (
                    f"uses '{key}', which is not supported in {self.context}: the grammar cannot "
                    "enforce it. Remove it, or validate it after generation."))
        if schema.get("nullable") is True:  # OpenAPI 3.0's spelling of "or null"
            rest = {k: v for k, v in schema.items() if k != "nullable"}
            return {"anyOf": [self.node(rest, ptr), {"type": "null"}]}
        for key in COMBINATORS:
            if key in schema:
                return self._combinator(key, schema, ptr)
        types = self._types(schema, ptr)
        if len(types) > 1:
            return {"anyOf": [self._typed(t, schema, ptr) for t in types]}
        return self._typed(types[0], schema, ptr) if types else ANY

    def _types(self, schema: dict[str, Any], ptr: str) -> list[str]:
        declared = schema.get("type")
        if declared is None:  # the first type whose keywords appear: a subset, never a superset
            return [t for t, keys in TYPE_KEYWORDS.items() if any(k in schema for k in keys)][:1]
        types = declared if isinstance(declared, list) else [declared]
        for t in types:
            if t not in TYPES:
                raise self.fail(f"{ptr}/type", f"has type {json.dumps(t)}, which is not a "
                                f"JSON Schema type; use one of {', '.join(TYPES)}.")
        if not types:
            raise self.fail(f"{ptr}/type", "is an empty list of types: no value could match.")
        unique = list(dict.fromkeys(types))
        return [t for t in unique if t != "integer"] if "number" in unique else unique

    def _typed(self, t: str, schema: dict[str, Any], ptr: str) -> dict[str, Any]:
        if t == "object":
            props = schema.get("properties")
            if props is not None and not isinstance(props, dict):
                raise self.fail(f"{ptr}/properties", "must be an object of property schemas.")
            entries = [(k, v, f"{ptr}/properties/{_escape(k)}") for k, v in (props or {}).items()]
            return self._object(entries, schema, ptr, listed=props is not None)
        if t == "array":
            return self._array(schema, ptr)
        if t == "string":
            return self._string(schema, ptr)
        return {"type": t}

    def _combinator(self, key: str, schema: dict[str, Any], ptr: str) -> dict[str, Any]:
        if key == "allOf":
            return self._all_of(schema, ptr)
        allowed = {key, "type"} if key in ("enum", "const") else {key}
        beside = [k for k in schema if k in ASSERTIONS and k not in allowed]
        if beside:
            raise self.fail(f"{ptr}/{beside[0]}", (
                f"is beside '{key}', and the grammar would ignore it there: move it into "
                f"the schemas that '{key}' names, or remove it."))
        value = schema[key]
        if key == "$ref":
            return self._ref(value, f"{ptr}/$ref")
        if key in ("anyOf", "oneOf"):  # oneOf is generated like anyOf: exclusivity is not checked
            if not isinstance(value, list) or not value:
                raise self.fail(f"{ptr}/{key}", "must be a non-empty array of schemas.")
            return {"anyOf": [self.node(s, f"{ptr}/{key}/{i}") for i, s in enumerate(value)]}
        return self._choice(key, schema, ptr)

    def _choice(self, key: str, schema: dict[str, Any], ptr: str) -> dict[str, Any]:
        values = [schema["const"]] if key == "const" else schema["enum"]
        if not isinstance(values, list) or not values:
            raise self.fail(f"{ptr}/enum", "must be a non-empty array of values.")
        if "type" in schema:
            types = self._types(schema, ptr)
            values = [v for v in values if _json_type(v) in types
                      or (_json_type(v) == "integer" and "number" in types)]
            if not values:
                raise self.fail(f"{ptr}/{key}", "has no value of the schema's 'type'.")
        return {"enum": values}

    def _ref(self, ref: Any, ptr: str) -> dict[str, Any]:
        pointer = self._target(ref, ptr)
        if pointer not in self._names:
            last = re.sub(r"[^a-zA-Z0-9]+", "-", pointer.rsplit("/", 1)[-1]).strip("-")
            self._names[pointer] = f"{self.prefix}ref{len(self._names)}-{last or 'root'}"
            self._queue.append(pointer)
        return {"$ref": f"#/$defs/{self._names[pointer]}"}

    def _target(self, ref: Any, ptr: str) -> str:
        """The JSON pointer a local `$ref` names (checked to exist)."""
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise self.fail(ptr, f"is {json.dumps(ref)}: only references within the schema "
                            "('#/$defs/Name') are supported. Inline the referenced schema.")
        pointer = re.sub(r"%([0-9A-Fa-f]{2})", lambda m: chr(int(m[1], 16)), ref[1:])
        self._lookup(pointer, ptr)
        return pointer

    def _lookup(self, pointer: str, ptr: str) -> Any:
        target = self.root
        for token in pointer.split("/")[1:]:
            token = token.replace("~1", "/").replace("~0", "~")
            if isinstance(target, list) and token.isdigit() and int(token) < len(target):
                target = target[int(token)]
            elif isinstance(target, dict) and token in target:
                target = target[token]
            else:
                raise self.fail(ptr, "points to nothing in the schema.")
        return target

    def _all_of(self, schema: dict[str, Any], ptr: str) -> dict[str, Any]:
        parts = schema["allOf"]
        if not isinstance(parts, list) or not parts:
            raise self.fail(f"{ptr}/allOf", "must be a non-empty array of schemas.")
        rest = {k: v for k, v in schema.items() if k != "allOf"}
        if len(parts) == 1 and not ASSERTIONS.intersection(rest):
            return self.node(parts[0], f"{ptr}/allOf/0")
        # Several parts: supported when each is an object schema; their properties are merged.
        components = [(rest, ptr)] + [self._follow(p, f"{ptr}/allOf/{i}")
                                      for i, p in enumerate(parts)]
        entries: list[tuple[str, Any, str]] = []
        required: list[Any] = []
        for part, where in components:
            if not isinstance(part, dict):
                part = self.node(part, where)  # `true` is {}-like; anything else is refused
            extra = [k for k in part if k in ASSERTIONS and k not in TYPE_KEYWORDS["object"]
                     and not (k == "type" and part[k] == "object")]
            if extra:
                raise self.fail(f"{where}/{extra[0]}", "is not supported in 'allOf': allOf can "
                                "only combine object schemas with 'properties'.")
            properties = part.get("properties") or {}
            if not isinstance(properties, dict):
                raise self.fail(f"{where}/properties", "must be an object of property schemas.")
            for key, value in properties.items():
                if any(key == name for name, _, _ in entries):
                    raise self.fail(f"{where}/properties/{_escape(key)}", "is defined twice in "
                                    "'allOf'; define each property once.")
                entries.append((key, value, f"{where}/properties/{_escape(key)}"))
            required += part.get("required", [])
        merged = {"required": required, "additionalProperties": False}
        return self._object(entries, merged, ptr, listed=True)

    def _follow(self, part: Any, ptr: str) -> tuple[Any, str]:
        for _ in range(32):
            if not (isinstance(part, dict) and set(part) & ASSERTIONS == {"$ref"}):
                return part, ptr
            ptr = self._target(part["$ref"], f"{ptr}/$ref")
            part = self._lookup(ptr, ptr)
        raise self.fail(ptr, "is a chain of references that never ends.")

    def _object(self, entries: list[tuple[str, Any, str]], schema: dict[str, Any], ptr: str,
                *, listed: bool) -> dict[str, Any]:
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise self.fail(f"{ptr}/required", "must be an array of property names.")
        names = [name for name, _, _ in entries]
        for name in required:
            if name not in names:
                raise self.fail(f"{ptr}/required", (
                    f"lists '{name}', which is not in 'properties': the grammar generates only "
                    "listed properties. Add it to 'properties'."))
        out: dict[str, Any] = {"type": "object"}
        if listed:
            out["properties"] = {name: self.node(s, where) for name, s, where in entries}
        if required:
            out["required"] = list(dict.fromkeys(required))
        extra = schema.get("additionalProperties")
        if extra is False or (extra is True and listed):
            out["additionalProperties"] = ANY if extra else False
        elif extra is not None and extra is not True:
            out["additionalProperties"] = self.node(extra, f"{ptr}/additionalProperties")
        return out

    def _array(self, schema: dict[str, Any], ptr: str) -> dict[str, Any]:
        items, prefix = schema.get("items"), schema.get("prefixItems")
        if isinstance(items, list):  # draft 4-7 tuples
            items, prefix = None, items
        low, high = self._bounds(schema, "minItems", "maxItems", ptr)
        if prefix is not None:
            if items is not None and items is not False:
                raise self.fail(f"{ptr}/items", "beside 'prefixItems' is not supported: list "
                                "every item in 'prefixItems'.")
            if not isinstance(prefix, list) or low > len(prefix) or (
                    high is not None and high < len(prefix)):
                raise self.fail(f"{ptr}/prefixItems", "must be an array of schemas whose length "
                                "is within minItems and maxItems.")
            return {"type": "array", "prefixItems": [
                self.node(s, f"{ptr}/prefixItems/{i}") for i, s in enumerate(prefix)]}
        if items is False:
            high = 0
        item = ANY if items is None or items is False else self.node(items, f"{ptr}/items")
        if low > (high if high is not None else low):
            raise self.fail(f"{ptr}/minItems", "is more than maxItems: no array could match.")
        bounds = {"minItems": low} | ({} if high is None else {"maxItems": high})
        return {"type": "array", "items": item, **bounds}

    def _string(self, schema: dict[str, Any], ptr: str) -> dict[str, Any]:
        given = [k for k in TYPE_KEYWORDS["string"] if k in schema]
        if given and given[0] in ("pattern", "format") and len(given) > 1:
            raise self.fail(f"{ptr}/{given[1]}", (
                f"cannot be combined with '{given[0]}': the grammar enforces only one of them. "
                "Remove one, or validate it after generation."))
        if "pattern" in schema:
            try:
                return {"type": "string", "pattern": translate_pattern(schema["pattern"])}
            except PatternError as exc:
                raise self.fail(f"{ptr}/pattern", f"{exc}.") from None
        if "format" in schema:
            if not isinstance(schema["format"], str) or schema["format"] not in FORMATS:
                raise self.fail(f"{ptr}/format", (
                    f"is {json.dumps(schema['format'])}, which is not supported in "
                    f"{self.context}; supported formats: {', '.join(sorted(FORMATS))}. "
                    "Remove it, or validate it after generation."))
            return {"type": "string", "format": schema["format"]}
        low, high = self._bounds(schema, "minLength", "maxLength", ptr)
        if high is not None and low > high:
            raise self.fail(f"{ptr}/minLength", "is more than maxLength: no string could match.")
        if not low and high is None:
            return {"type": "string"}
        return {"type": "string", "minLength": low} | ({} if high is None else {"maxLength": high})

    def _bounds(self, schema: dict[str, Any], low_key: str, high_key: str,
                ptr: str) -> tuple[int, int | None]:
        for key in (low_key, high_key):
            value = schema.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= MAX_REPEAT):
                raise self.fail(f"{ptr}/{key}", f"must be an integer from 0 to {MAX_REPEAT}.")
        return int(schema.get(low_key) or 0), schema.get(high_key)
