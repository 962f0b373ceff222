"""A JSON schema (Ollama's `format: {...}`, OpenAI's `response_format: json_schema`) as a
json_grammar.Grammar, with llama.cpp's json-schema-to-grammar's reading of it: an object's
declared properties come in the schema's order, the required ones first, and no others unless
`additionalProperties` allows them (and then not under a declared key's name); `type` (one or a
list), `enum`, `const`, `anyOf` / `oneOf`, `$ref` into `$defs` / `definitions` (recursion
included), `items`, `minItems` / `maxItems`, `minLength` / `maxLength`; an integer's or a
number's `minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum` (json_grammar.IntRange,
NumberRange); a string's `pattern` and its `format` date, time, date-time and uuid
(schema_strings.py; another format is an annotation); `prefixItems` (tuples); `allOf` of one
schema, of object schemas (merged) or of enums (intersected); `multipleOf` of an integer, or of a
number (where it is an integer: its integers; 0.01: at most 2 decimals; 0.25: 0, 0.25, 0.5, ...,
of at most 2 decimals; written without an exponent). Keywords that
would constrain what this does not follow (other `allOf`s, a pattern together with lengths, ...)
are refused by name rather than ignored; descriptive ones (`title`, `description`, `default`,
`examples`) are ignored.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from typing import Any

from .gbnf import embed_gbnf
from .json_grammar import (MAX_INT_DIGITS, Array, Either, Grammar, IntRange, Literal, Node, Number, NumberRange,
                           Object, Root, String, any_value)
from .schema_strings import PatternError, format_gbnf, pattern_gbnf

UNSUPPORTED = ("not", "if", "then", "else", "uniqueItems", "contains", "patternProperties",
               "propertyNames", "minProperties", "maxProperties", "dependentRequired", "dependentSchemas")
TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")  # an integer's
# what says nothing of the value (allOf's siblings may be these and still be one schema)
ANNOTATIONS = ("title", "description", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly",
               "$defs", "definitions", "$schema", "$id")


class SchemaError(ValueError):
    """A schema qvl cannot follow; the message names where in it."""


def _literal(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": ")).encode()


class _Builder:
    def __init__(self, root: dict[str, Any]):
        self.root = root
        self.nodes: list[Node] = []
        self.refs: dict[str, int] = {}
        self._any: int | None = None
        self._merging: set[int] = set()  # the allOf schemas being merged (one reached again: a loop)

    def add(self, node: Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def any(self) -> int:
        if self._any is None:
            self._any = any_value(self.nodes)
        return self._any

    def ref(self, ref: Any, where: str) -> int:
        if ref in self.refs:
            return self.refs[ref]
        if not isinstance(ref, str) or not ref.startswith(("#/$defs/", "#/definitions/")):
            raise SchemaError(f"{where}.$ref {ref!r}: only #/$defs/NAME or #/definitions/NAME")
        section, _, name = ref[2:].partition("/")
        target = self.root.get(section, {}).get(name) if isinstance(self.root.get(section), dict) else None
        if target is None:
            raise SchemaError(f"{where}.$ref {ref!r}: no such definition")
        nid = self.add(Either(()))  # a placeholder, so that a definition may refer to itself
        self.refs[ref] = nid
        self.nodes[nid] = Either((self.node(target, f"#/{section}/{name}"),))
        return nid

    def node(self, s: Any, where: str) -> int:
        if s is True or s == {}:
            return self.any()
        if not isinstance(s, dict):
            raise SchemaError(f"{where}: a schema is a JSON object")
        for key in UNSUPPORTED:
            if key in s:
                raise SchemaError(f"{where}: {key!r} is not followed by qvl")
        types = s.get("type") if isinstance(s.get("type"), list) else [s.get("type")]
        if "multipleOf" in s and (not {"integer", "number"} & set(types) or
                                  any(k in s for k in ("const", "enum", "anyOf", "oneOf", "$ref", "allOf"))):
            raise SchemaError(f"{where}: multipleOf is followed by qvl with type integer or number, and no const, "
                              "enum, anyOf, oneOf, $ref or allOf beside it")
        if "allOf" in s:
            if id(s) in self._merging:
                raise SchemaError(f"{where}.allOf: refers to itself through allOf")
            self._merging.add(id(s))
            try:
                return self.node(self._all_of(s, where), where)
            finally:
                self._merging.discard(id(s))
        if "$ref" in s:
            return self.ref(s["$ref"], where)
        if "const" in s:
            return self.add(Literal((_literal(s["const"]),)))
        if "enum" in s:
            if not isinstance(s["enum"], list) or not s["enum"]:
                raise SchemaError(f"{where}.enum: a non-empty list")
            return self.add(Literal(tuple(dict.fromkeys(_literal(v) for v in s["enum"]))))
        for key in ("anyOf", "oneOf"):
            if key in s:
                if not isinstance(s[key], list) or not s[key]:
                    raise SchemaError(f"{where}.{key}: a non-empty list")
                return self.add(Either(tuple(self.node(x, f"{where}.{key}[{i}]") for i, x in enumerate(s[key]))))
        kind = s.get("type")
        if isinstance(kind, list):
            if not kind:
                raise SchemaError(f"{where}.type: a non-empty list")
            return self.add(Either(tuple(self.node({**s, "type": k}, where) for k in kind)))
        if kind is None:
            kind = "object" if "properties" in s else "array" if "items" in s else None
        if kind is None:
            for key in (*BOUNDS, "pattern"):
                if key in s:
                    raise SchemaError(f"{where}: {key!r} without a type is not followed by qvl")
            return self.any()
        if kind not in TYPES:
            raise SchemaError(f"{where}.type {kind!r}: one of {', '.join(TYPES)}")
        return getattr(self, f"_{kind}")(s, where)

    def _object(self, s: dict[str, Any], where: str) -> int:
        props = s.get("properties", {})
        required = s.get("required", [])
        if not isinstance(props, dict) or not isinstance(required, list):
            raise SchemaError(f"{where}: properties an object, required a list")
        for r in required:
            if r not in props:
                raise SchemaError(f"{where}.required: {r!r} is not among the properties")
        extra_schema = s.get("additionalProperties", None if props else True)
        order = [k for k in props if k in required] + [k for k in props if k not in required]
        keys = tuple((self.add(Literal((_literal(k),))), self.node(props[k], f"{where}.properties.{k}"))
                     for k in order)
        extra = extra_key = None
        if extra_schema is not None and extra_schema is not False:
            extra = self.node(extra_schema, f"{where}.additionalProperties")
            extra_key = self.add(String(exclude=tuple(_literal(k)[1:-1] for k in order)))
        return self.add(Object(keys, len(set(required)), extra, extra_key))

    def _array(self, s: dict[str, Any], where: str) -> int:
        lo, hi = s.get("minItems", 0), s.get("maxItems")
        if not isinstance(lo, int) or lo < 0 or (hi is not None and (not isinstance(hi, int) or hi < lo)):
            raise SchemaError(f"{where}: minItems / maxItems are integers, 0 <= minItems <= maxItems")
        prefix = s.get("prefixItems", [])
        if not isinstance(prefix, list):
            raise SchemaError(f"{where}.prefixItems: a list of schemas")
        first = tuple(self.node(x, f"{where}.prefixItems[{i}]") for i, x in enumerate(prefix))
        rest = s.get("items", True)
        item = None if rest is False else self.node(rest, f"{where}.items")
        return self.add(Array(item, lo, hi, first))

    def _resolved(self, s: Any, where: str, seen: frozenset[str] = frozenset()) -> Any:
        """A schema with its $ref followed (to a definition, which may be another $ref)."""
        if isinstance(s, dict) and set(s) - set(ANNOTATIONS) == {"$ref"}:
            ref = s["$ref"]
            if ref in seen:
                raise SchemaError(f"{where}.$ref {ref!r}: refers to itself through allOf")
            self.ref(ref, where)  # checks it
            section, _, name = ref[2:].partition("/")
            return self._resolved(self.root[section][name], where, seen | {ref})
        return s

    def _all_of(self, s: dict[str, Any], where: str) -> Any:
        """allOf as the one schema it comes to: its only schema; object schemas merged (their
        properties in order, required ones all required); or enums intersected."""
        parts = s["allOf"]
        if not isinstance(parts, list) or not parts:
            raise SchemaError(f"{where}.allOf: a non-empty list")
        rest = {k: v for k, v in s.items() if k != "allOf" and k not in ANNOTATIONS}
        comps = [self._resolved(p, f"{where}.allOf[{i}]") for i, p in enumerate(parts)] + ([rest] if rest else [])
        if len(comps) == 1:
            return comps[0]
        if all(isinstance(c, dict) and set(c) <= {"enum", *ANNOTATIONS} and "enum" in c for c in comps):
            keep = [v for v in comps[0]["enum"] if all(_literal(v) in {_literal(w) for w in c["enum"]} for c in comps)]
            if not keep:
                raise SchemaError(f"{where}.allOf: no value is in every enum")
            return {"enum": keep}
        merged: dict[str, Any] = {"type": "object", "properties": {}, "required": []}
        for i, c in enumerate(comps):
            known = {"type", "properties", "required", "additionalProperties", *ANNOTATIONS}
            if not isinstance(c, dict) or c.get("type", "object") != "object" or set(c) - known:
                raise SchemaError(f"{where}.allOf[{i}]: allOf of object schemas (merged) or enums (intersected) "
                                  "is what qvl follows")
            for key, value in c.get("properties", {}).items():
                if merged["properties"].setdefault(key, value) != value:
                    raise SchemaError(f"{where}.allOf[{i}].properties.{key}: a second, different schema for it")
            merged["required"] += [r for r in c.get("required", []) if r not in merged["required"]]
            if "additionalProperties" in c:
                if merged.setdefault("additionalProperties", c["additionalProperties"]) != c["additionalProperties"]:
                    raise SchemaError(f"{where}.allOf[{i}].additionalProperties: differs from another's")
        return merged

    def _string(self, s: dict[str, Any], where: str) -> int:
        lo, hi = s.get("minLength", 0), s.get("maxLength")
        if not isinstance(lo, int) or lo < 0 or (hi is not None and (not isinstance(hi, int) or hi < lo)):
            raise SchemaError(f"{where}: minLength / maxLength are integers, 0 <= minLength <= maxLength")
        fmt = s.get("format")
        if fmt is not None and not isinstance(fmt, str):
            raise SchemaError(f"{where}.format: a string")
        shape = format_gbnf(fmt) if fmt is not None else None
        if "pattern" in s:
            if not isinstance(s["pattern"], str):
                raise SchemaError(f"{where}.pattern: a string")
            try:
                shape = pattern_gbnf(s["pattern"]) if shape is None else ""
            except PatternError as e:
                raise SchemaError(f"{where}: {e}") from None
            if not shape:
                raise SchemaError(f"{where}: a pattern together with format {fmt!r} is not followed by qvl")
        if shape is None:
            return self.add(String(lo, hi))
        if "minLength" in s or "maxLength" in s:
            what = "a pattern" if "pattern" in s else f"format {fmt!r}"
            raise SchemaError(f"{where}: minLength / maxLength together with {what} are not followed by qvl")
        return embed_gbnf(shape, self.nodes)

    @staticmethod
    def _bounds(s: dict[str, Any], where: str) -> dict[str, Fraction]:
        """An integer's or number's minimum / maximum / exclusive ones, exact (a float as the decimal it is written)."""
        bounds = {k: s[k] for k in BOUNDS if k in s}
        for k, v in bounds.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise SchemaError(f"{where}.{k}: a number")
        return {k: Fraction(repr(v)) if isinstance(v, float) else Fraction(v) for k, v in bounds.items()}

    @staticmethod
    def _multiple(s: dict[str, Any], where: str) -> Fraction | None:
        """multipleOf, exact (a float as the decimal it is written), or None."""
        if "multipleOf" not in s:
            return None
        v = s["multipleOf"]
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise SchemaError(f"{where}.multipleOf: a number above 0")
        return Fraction(repr(v)) if isinstance(v, float) else Fraction(v)

    def _integer(self, s: dict[str, Any], where: str) -> int:
        multiple = self._multiple(s, where)
        step = 1 if multiple is None else multiple.numerator  # v = k * p / q, p and q coprime: p divides v
        bounds = self._bounds(s, where)
        lows = [math.ceil(bounds["minimum"])] if "minimum" in bounds else []
        lows += [math.floor(bounds["exclusiveMinimum"]) + 1] if "exclusiveMinimum" in bounds else []
        highs = [math.floor(bounds["maximum"])] if "maximum" in bounds else []
        highs += [math.ceil(bounds["exclusiveMaximum"]) - 1] if "exclusiveMaximum" in bounds else []
        lo, hi = max(lows, default=None), min(highs, default=None)  # both of a kind: the tighter
        if lo is not None and hi is not None and lo > hi:
            raise SchemaError(f"{where}: no integer is between its bounds ({lo} > {hi})")
        if lo is not None and hi is not None and hi // step * step < lo:
            raise SchemaError(f"{where}: no multiple of {step} is between its bounds ({lo} and {hi})")
        if lo is None and hi is None and step == 1:
            return self.add(Number(integer=True))
        return self.add(IntRange(lo, hi, step))

    def _number(self, s: dict[str, Any], where: str) -> int:
        multiple = self._multiple(s, where)
        places, units = None, 1
        if multiple is not None and multiple.denominator == 1:
            return self._integer(s, where)  # the integers it allows (not 10.0 for 10: a part of what it allows)
        if multiple is not None:  # a decimal (a float as written): units of its last place
            places = next((k for k in range(MAX_INT_DIGITS + 1) if (multiple * 10 ** k).denominator == 1), None)
            if places is None:
                raise SchemaError(f"{where}.multipleOf {s['multipleOf']}: qvl writes at most {MAX_INT_DIGITS} "
                                  "decimals")
            units = (multiple * 10 ** places).numerator
        exact = self._bounds(s, where)
        if not exact and places is None:
            return self.add(Number())
        # the tighter of minimum and exclusiveMinimum (and of the maxima), as both must hold
        lows = [(exact[k], k == "exclusiveMinimum") for k in ("minimum", "exclusiveMinimum") if k in exact]
        highs = [(exact[k], k == "exclusiveMaximum") for k in ("maximum", "exclusiveMaximum") if k in exact]
        lo, lo_open = max(lows, key=lambda b: (b[0], b[1])) if lows else (None, False)
        hi, hi_open = min(highs, key=lambda b: (b[0], not b[1])) if highs else (None, False)
        if lo is not None and hi is not None and (lo > hi or lo == hi and (lo_open or hi_open)):
            raise SchemaError(f"{where}: no number is between its bounds")
        numbers = NumberRange(lo, hi, lo_open, hi_open, places, units)
        if not numbers.any():
            raise SchemaError(f"{where}: no multiple of {s['multipleOf']} is between its bounds")
        return self.add(numbers)

    def _boolean(self, s: dict[str, Any], where: str) -> int:
        return self.add(Literal((b"true", b"false")))

    def _null(self, s: dict[str, Any], where: str) -> int:
        return self.add(Literal((b"null",)))


def schema_grammar(schema: Any) -> Grammar:
    """The Grammar of the values `schema` allows, or a SchemaError naming what it cannot follow."""
    if not isinstance(schema, dict):
        raise SchemaError("a JSON schema is a JSON object")
    b = _Builder(schema)
    value = b.node(schema, "#")
    b.add(Root(value))
    return Grammar(b.nodes)
