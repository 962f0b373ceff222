"""A JSON schema's string `format`s and `pattern`s as GBNF grammars of the JSON string (its
quotes included), for json_schema.py to embed (gbnf.embed_gbnf).

Formats are llama.cpp's json-schema-to-grammar's: `date`, `time`, `date-time` and `uuid` (also
uuid1..uuid5) are kept to; any other format is an annotation, as JSON Schema 2020-12 has it and
llama.cpp reads it (the string is any string). A `pattern` is an ECMA-262 regular expression of
this subset: literal characters and escapes (`\\d \\w \\s`, their capitals, `\\t \\n \\r`,
`\\xHH`, `\\uHHHH`, an escaped punctuation character), `.`, classes `[...]` / `[^...]`, groups
`(...)` / `(?:...)` / `(?<name>...)`, `|`, and `* + ? {m} {m,} {m,n}` (a lazy `?` after them
changes nothing here). Unanchored, it may match anywhere in the string (JSON Schema's reading:
`.*` is added where `^` or `$` is missing; llama.cpp refuses such a pattern). The string's
characters are JSON's: a `"`, a backslash or a control character the pattern allows is
written as its JSON escape; `.` and negated classes stand for characters JSON writes as they
are. Anything else (back references, look-arounds, `\\b`, `\\p{...}`, anchors inside) is refused
by name.
"""

from __future__ import annotations

import json

DATE = 'date ::= [0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [1-2] [0-9] | "3" [0-1] )\n'
TIME = ('time ::= ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{3} )? '
        '( "Z" | ( "+" | "-" ) ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )\n')
FORMATS = {
    "date": 'root ::= "\\"" date "\\""\n' + DATE,
    "time": 'root ::= "\\"" time "\\""\n' + TIME,
    "date-time": 'root ::= "\\"" date "T" time "\\""\n' + DATE + TIME,
    "uuid": 'root ::= "\\"" [0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" '
            '[0-9a-fA-F]{12} "\\""\n',
}
MAX_CODE = 0x10FFFF
# characters a JSON string holds as they are: not a control, not " or backslash (nor DEL, as json.gbnf)
PLAIN = ((0x20, 0x21), (0x23, 0x5B), (0x5D, 0x7E), (0x80, MAX_CODE))
_CLASS_ESCAPES = {"d": ((0x30, 0x39),), "w": ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)),
                  "s": ((0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
                        (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF))}
_CHAR_ESCAPES = {"t": 0x09, "n": 0x0A, "r": 0x0D, "f": 0x0C, "v": 0x0B, "0": 0x00}


class PatternError(ValueError):
    """A pattern outside the subset qvl follows; the message says what in it."""


def format_gbnf(fmt: str) -> str | None:
    """The grammar of a string of `fmt`, or None where the format is only an annotation."""
    return FORMATS.get("uuid" if fmt in ("uuid1", "uuid2", "uuid3", "uuid4", "uuid5") else fmt)


def _normal(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _complement(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out, at = [], 0
    for lo, hi in _normal(ranges):
        if lo > at:
            out.append((at, lo - 1))
        at = max(at, hi + 1)
    return out + ([(at, MAX_CODE)] if at <= MAX_CODE else [])


def _intersect(a: list[tuple[int, int]], b: tuple[tuple[int, int], ...]) -> list[tuple[int, int]]:
    return [(max(x, y), min(p, q)) for x, p in _normal(a) for y, q in b if max(x, y) <= min(p, q)]


def _literal(text: str) -> str:
    """A GBNF literal of `text` as a JSON string writes it."""
    written = json.dumps(text, ensure_ascii=False)[1:-1].replace("\x7f", "\\u007f")
    return '"' + "".join(f"\\U{ord(c):08X}" if c in '"\\' or ord(c) < 0x20 else c for c in written) + '"'


def _chars(ranges: list[tuple[int, int]]) -> str:
    """GBNF for one character of `ranges`, as a JSON string writes it."""
    plain = _intersect(ranges, PLAIN)
    parts = []
    if plain:
        parts.append("[" + "".join(f"\\U{lo:08X}" + (f"-\\U{hi:08X}" if hi > lo else "") for lo, hi in plain) + "]")
    escaped = [c for lo, hi in _normal(ranges) for c in range(lo, min(hi, 0x7F) + 1)
               if c < 0x20 or c in (0x22, 0x5C, 0x7F)]
    parts += [_literal(chr(c)) for c in escaped]
    if not parts:
        raise PatternError("a character class no character is in")
    return parts[0] if len(parts) == 1 else "(" + " | ".join(parts) + ")"


class _Regex:
    def __init__(self, text: str, shown: str):
        self.text, self.pos, self.shown = text, 0, shown

    def fail(self, what: str) -> PatternError:
        return PatternError(f"pattern {self.shown!r}: {what}")

    def peek(self) -> str:
        return self.text[self.pos:self.pos + 1]

    def alternatives(self) -> str:
        options = [self.sequence()]
        while self.peek() == "|":
            self.pos += 1
            options.append(self.sequence())
        return options[0] if len(options) == 1 else "(" + " | ".join(options) + ")"

    def sequence(self) -> str:
        items = []
        while self.peek() and self.peek() not in "|)":
            atom = self.atom()
            items.append(self.quantified(atom))
        return "(" + " ".join(items) + ")" if items else '""'

    def quantified(self, atom: str) -> str:
        c = self.peek()
        if c in ("*", "+", "?"):
            self.pos += 1
            suffix = c
        elif c == "{" and (bounds := self._bounds()) is not None:
            suffix = bounds
        else:
            return atom
        if self.peek() == "?":  # lazy: the same strings
            self.pos += 1
        if self.peek() in ("*", "+", "?", "{") and self.peek():
            raise self.fail("a quantifier on a quantifier")
        return f"({atom}){suffix}"

    def _bounds(self) -> str | None:
        end = self.text.find("}", self.pos)
        inner = self.text[self.pos + 1:end] if end > 0 else ""
        lo, comma, hi = inner.partition(",")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            return None  # a literal "{", as ECMA-262 reads one that starts no quantifier
        self.pos = end + 1
        if hi and int(hi) < int(lo):
            raise self.fail(f"{{{inner}}}: the most below the least")
        return "{" + lo + ("," + hi if comma else "") + "}"

    def atom(self) -> str:
        c = self.peek()
        self.pos += 1
        if c == "(":
            if self.text.startswith("?:", self.pos):
                self.pos += 2
            elif self.text.startswith("?<", self.pos) and self.text[self.pos + 2:self.pos + 3] not in ("=", "!"):
                self.pos = self.text.index(">", self.pos) + 1  # a named group: a group
            elif self.peek() == "?":
                raise self.fail("look-arounds and other (?...) groups are not followed")
            inner = self.alternatives()
            if self.peek() != ")":
                raise self.fail("a group without its ')'")
            self.pos += 1
            return inner
        if c == "[":
            return _chars(self.char_class())
        if c == ".":
            return _chars(_complement([(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)]))  # not a line end (ECMA-262)
        if c == "\\":
            ranges = self.escape(in_class=False)
            return _chars(ranges)
        if c in ("^", "$"):
            raise self.fail(f"{c!r} inside the pattern (anchors only at its ends)")
        if c in ("*", "+", "?", ")"):
            raise self.fail(f"{c!r} with nothing before it")
        return _literal(c)

    def escape(self, in_class: bool) -> list[tuple[int, int]]:
        e = self.peek()
        if not e:
            raise self.fail("a pattern ending in a backslash")
        self.pos += 1
        if e.lower() in _CLASS_ESCAPES:
            ranges = list(_CLASS_ESCAPES[e.lower()])
            return _complement(ranges) if e.isupper() else ranges
        if e in _CHAR_ESCAPES:
            return [(_CHAR_ESCAPES[e],) * 2]
        if e in ("x", "u"):
            n = 2 if e == "x" else 4
            digits = self.text[self.pos:self.pos + n]
            if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.fail(f"\\{e} wants {n} hex digits")
            self.pos += n
            return [(int(digits, 16),) * 2]
        if e == "b" and in_class:
            return [(0x08, 0x08)]
        if e.isalnum():
            raise self.fail(f"\\{e} is not followed (back references, \\b, \\p{{...}} and the like)")
        return [(ord(e), ord(e))]

    def char_class(self) -> list[tuple[int, int]]:
        negated = self.peek() == "^"
        self.pos += negated
        ranges: list[tuple[int, int]] = []
        while self.peek() and self.peek() != "]":
            lo_ranges = self.escape(in_class=True) if self._take("\\") else [(ord(self._next()),) * 2]
            single = len(lo_ranges) == 1 and lo_ranges[0][0] == lo_ranges[0][1]
            if single and self.peek() == "-" and self.text[self.pos + 1:self.pos + 2] not in ("]", ""):
                self.pos += 1
                hi_ranges = self.escape(in_class=True) if self._take("\\") else [(ord(self._next()),) * 2]
                if len(hi_ranges) != 1 or hi_ranges[0][0] != hi_ranges[0][1]:
                    raise self.fail("a range ending in a class escape")
                lo, hi = lo_ranges[0][0], hi_ranges[0][0]
                if hi < lo:
                    raise self.fail(f"the range {chr(lo)!r}-{chr(hi)!r} runs backwards")
                ranges.append((lo, hi))
            else:
                ranges.extend(lo_ranges)
        if self.peek() != "]":
            raise self.fail("a class without its ']'")
        self.pos += 1
        return _complement(ranges) if negated else _normal(ranges)

    def _take(self, c: str) -> bool:
        if self.peek() == c:
            self.pos += 1
            return True
        return False

    def _next(self) -> str:
        c = self.peek()
        self.pos += 1
        return c


def pattern_gbnf(pattern: str) -> str:
    """The grammar of a JSON string that `pattern` matches (a PatternError for what is not followed)."""
    body = pattern
    start = body.startswith("^")
    end = body.endswith("$") and not body.endswith("\\$")
    body = body[1 if start else 0:len(body) - (1 if end else 0)]
    r = _Regex(body, pattern)
    inner = r.alternatives()
    if r.pos < len(body):
        raise r.fail("an unmatched ')'")
    anywhere = _chars([(0, MAX_CODE)])
    return ('root ::= "\\"" ' + ("" if start else f"({anywhere})* ") + inner
            + ("" if end else f" ({anywhere})*") + ' "\\""\n')
