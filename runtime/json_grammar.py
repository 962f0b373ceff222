"""JSON grammars read byte by byte: any JSON object (`format="json"`, llama.cpp's json.gbnf) or
what a JSON schema allows (json_schema.py builds those nodes).

A grammar is a table of nodes (object, array, string, number, literals, alternatives, the root).
A parse is a set of stacks of (node, local state) frames: alternatives (an enum's values, anyOf,
which declared key comes next) are followed side by side until the bytes tell them apart, as an
Earley parser would, and a set of stacks is a hashable state (`JsonConstraint` keeps what each
token does to each state it met). As llama.cpp's grammars have it: no whitespace before the root
value; after `{ [ , :` and after each value, nothing, one space, or a newline and up to 20 spaces
or tabs (so a model cannot pad forever); strings hold no control bytes and only JSON's escapes;
integers have at most 16 digits; an object's keys come in the order declared, the required
ones first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

MAX_INT_DIGITS = 16
MAX_WS_INDENT = 20
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrt')
_DIGITS = frozenset(b"0123456789")

Frame = tuple[int, tuple[int, ...]]  # (node id, the node's local state)
Stack = tuple[Frame, ...]
State = frozenset[Stack]

# what a node does with a byte
STAY, PUSH, DONE, END = range(4)  # STAY (local); PUSH (its local after the child, child id): the byte is
# the child's first; DONE: the byte was its last; END: it ended before the byte, which goes to its parent


def _ws(ws: int, byte: int) -> int | None:
    """Whitespace count after one more whitespace byte (0: none yet, 1: one space, 2 + n: a newline
    and n indents), or None where no more may come."""
    if ws == 0:
        return 1 if byte == 0x20 else 2 if byte == 0x0A else None
    if ws >= 2 and byte in (0x20, 0x09) and ws - 2 < MAX_WS_INDENT:
        return ws + 1
    return None


def _is_ws(byte: int) -> bool:
    return byte in (0x20, 0x0A, 0x09)


@dataclass(frozen=True)
class Literal:
    """One of a few fixed byte strings (true, null, an enum's values as JSON, an object's keys)."""

    options: tuple[bytes, ...]

    def starts(self) -> list[tuple[int, ...]]:
        return [(i, 0) for i in range(len(self.options))]

    def step(self, local: tuple[int, ...], byte: int) -> list[tuple]:
        i, pos = local
        if self.options[i][pos] != byte:
            return []
        return [(DONE,)] if pos + 1 == len(self.options[i]) else [(STAY, (i, pos + 1))]


# a UTF-8 lead byte: (continuation bytes to come, the first one's range as in Unicode's table 3-7)
_UTF8_LEADS = {**{b: (1, (0x80, 0xBF)) for b in range(0xC2, 0xE0)}, 0xE0: (2, (0xA0, 0xBF)),
               **{b: (2, (0x80, 0xBF)) for b in (*range(0xE1, 0xED), 0xEE, 0xEF)}, 0xED: (2, (0x80, 0x9F)),
               0xF0: (3, (0x90, 0xBF)), 0xF1: (3, (0x80, 0xBF)), 0xF2: (3, (0x80, 0xBF)), 0xF3: (3, (0x80, 0xBF)),
               0xF4: (3, (0x80, 0x8F))}


@dataclass(frozen=True)
class String:
    """A JSON string of min_len..max_len characters (an escape is one, as is a UTF-8 character) in
    valid UTF-8 (a token that is part of a character is taken only where the rest can follow),
    other than the `exclude`d ones (an object's declared keys, as additional keys; written as
    they are, not through escapes)."""

    min_len: int = 0
    max_len: int | None = None
    exclude: tuple[bytes, ...] = ()

    def starts(self) -> list[tuple[int, ...]]:
        return [(0, 0, 0, 0, 0x80, 0xBF, 0, (1 << len(self.exclude)) - 1)]

    def step(self, local: tuple[int, ...], byte: int) -> list[tuple]:
        # phase 0: before the opening quote; esc: 1 after a backslash, 11..14 in a \u escape's hex
        # digits; need: UTF-8 continuation bytes to come, the next one in lo..hi; pos: bytes so
        # far and alive: a bit for each excluded string they still spell (both 0 without any)
        phase, count, esc, need, lo, hi, pos, alive = local
        if phase == 0:
            return [(STAY, (1, 0, 0, 0, 0x80, 0xBF, 0, alive))] if byte == 0x22 else []
        if byte == 0x22 and esc == 0 and need == 0:
            spelled = any(alive >> i & 1 and len(x) == pos for i, x in enumerate(self.exclude))
            return [(DONE,)] if count >= self.min_len and not spelled else []
        if alive:
            alive = sum(1 << i for i, x in enumerate(self.exclude)
                        if alive >> i & 1 and pos < len(x) and x[pos] == byte)
        more = (pos + 1, alive) if self.exclude else (0, 0)
        if need:
            return [(STAY, (1, count, 0, need - 1, 0x80, 0xBF, *more))] if lo <= byte <= hi else []
        if esc == 0:
            if byte == 0x5C:
                return [(STAY, (1, count, 1, 0, 0x80, 0xBF, *more))]
            if byte < 0x20 or byte == 0x7F:
                return []
            if byte < 0x80:
                return self._count(count + 1, 0, (0, 0x80, 0xBF, *more))
            if byte not in _UTF8_LEADS:
                return []
            n, (first_lo, first_hi) = _UTF8_LEADS[byte]
            return self._count(count + 1, 0, (n, first_lo, first_hi, *more))
        if esc == 1:
            if byte == 0x75:
                return self._count(count + 1, 14, (0, 0x80, 0xBF, *more))
            return self._count(count + 1, 0, (0, 0x80, 0xBF, *more)) if byte in _ESCAPES else []
        return [(STAY, (1, count, 0 if esc == 11 else esc - 1, 0, 0x80, 0xBF, *more))] if byte in _HEX else []

    def _count(self, count: int, esc: int, rest: tuple[int, ...]) -> list[tuple]:
        if self.max_len is None:
            count = min(count, self.min_len)  # counted only as far as it matters: a string's states repeat
        elif count > self.max_len:
            return []
        return [(STAY, (1, count, esc, *rest))]

    @property
    def free(self) -> bool:
        """Any text may go inside (no bounds, nothing excluded): JsonConstraint lets plain tokens through."""
        return self.max_len is None and not self.exclude


# number parts: before it, after "-", after a leading 0, integer digits, after ".", fraction digits,
# after e/E, after the exponent's sign, exponent digits
_START, _MINUS, _ZERO, _INT, _DOT, _FRAC, _EXP, _EXP_SIGN, _EXP_DIGITS = range(9)
_NUMBER_ENDS = frozenset((_ZERO, _INT, _FRAC, _EXP_DIGITS))


@dataclass(frozen=True)
class Number:
    integer: bool = False

    def starts(self) -> list[tuple[int, ...]]:
        return [(_START, 0)]

    def step(self, local: tuple[int, ...], byte: int) -> list[tuple]:
        part, n = local
        digit = byte in _DIGITS
        nxt: tuple[int, int] | None = None
        if part in (_START, _MINUS) and digit:
            nxt = (_ZERO if byte == 0x30 else _INT, 1)
        elif part == _START and byte == 0x2D:
            nxt = (_MINUS, 0)
        elif part == _INT and digit:
            nxt = (_INT, n + 1) if n < MAX_INT_DIGITS else None
        elif not self.integer and part in (_ZERO, _INT) and byte == 0x2E:
            nxt = (_DOT, 0)
        elif part in (_DOT, _FRAC) and digit:
            nxt = (_FRAC, 1)
        elif not self.integer and part in (_ZERO, _INT, _FRAC) and byte in (0x65, 0x45):
            nxt = (_EXP, 0)
        elif part == _EXP and byte in (0x2B, 0x2D):
            nxt = (_EXP_SIGN, 0)
        elif part in (_EXP, _EXP_SIGN, _EXP_DIGITS) and digit:
            nxt = (_EXP_DIGITS, n + 1) if n < MAX_INT_DIGITS else None
        if nxt is not None:
            return [(STAY, nxt)]
        return [(END,)] if part in _NUMBER_ENDS else []

    @staticmethod
    def can_end(local: tuple[int, ...]) -> bool:
        return local[0] in _NUMBER_ENDS


@dataclass(frozen=True)
class IntRange:
    """A JSON integer in lo..hi (None: no bound; a schema's minimum / maximum) that is a multiple
    of `multiple` (a schema's multipleOf), of at most MAX_INT_DIGITS digits, "-0" not among them: a
    digit is taken only where some integer of the range starts with the digits so far."""

    lo: int | None
    hi: int | None
    multiple: int = 1

    def starts(self) -> list[tuple[int, ...]]:
        return [(0, 0, 0, 0)]  # (phase: 0 before it, 1 after "-", 2 in its digits; negative; value; digits)

    def _holds(self, x: int) -> bool:
        return (self.lo is None or x >= self.lo) and (self.hi is None or x <= self.hi) and x % self.multiple == 0

    def _any_in(self, x: int, y: int) -> bool:
        """Some integer of the range is in x..y."""
        x, y = max(x, self.lo) if self.lo is not None else x, min(y, self.hi) if self.hi is not None else y
        return x <= y and y // self.multiple * self.multiple >= x

    def _possible(self, negative: int, value: int, digits: int) -> bool:
        """Some integer of the range has this sign and starts with these digits."""
        more = [0] if value == 0 else range(MAX_INT_DIGITS - digits + 1)  # nothing follows a leading 0
        for k in more:
            a, b = value * 10 ** k, value * 10 ** k + 10 ** k - 1
            if self._any_in(*((-b, -a) if negative else (a, b))):
                return True
        return False

    def step(self, local: tuple[int, ...], byte: int) -> list[tuple]:
        phase, negative, value, digits = local
        if byte in _DIGITS:
            d = byte - 0x30
            if phase == 2 and (value == 0 or digits >= MAX_INT_DIGITS) or phase == 1 and d == 0:
                return []
            nxt = (2, negative, value * 10 + d, digits + 1) if phase == 2 else (2, negative, d, 1)
            return [(STAY, nxt)] if self._possible(*nxt[1:]) else []
        if phase == 0 and byte == 0x2D and self._any_in(-10 ** MAX_INT_DIGITS + 1, -1):
            return [(STAY, (1, 1, 0, 0))]
        return [(END,)] if self.can_end(local) else []

    def can_end(self, local: tuple[int, ...]) -> bool:
        phase, negative, value, _ = local
        return phase == 2 and self._holds(-value if negative else value)


@dataclass(frozen=True)
class NumberRange:
    """A JSON number between lo and hi (None: no bound; `lo_open` / `hi_open`: the bound itself
    excluded; a schema's minimum / exclusiveMinimum / ...), written without an exponent, with at
    most MAX_INT_DIGITS digits before the point and after it: a byte is taken only where some
    number of the range starts with what has been written. With `places`, at most that many
    digits after the point, and a multiple of `units` of the last place (a schema's multipleOf
    0.01 is 2 places, 1 unit; 0.25 is 2 places, 25 units; 2.5 is 1 place, 25 units)."""

    lo: Fraction | None
    hi: Fraction | None
    lo_open: bool = False
    hi_open: bool = False
    places: int | None = None
    units: int = 1

    def starts(self) -> list[tuple[int, ...]]:
        return [(0, 0, 0, 0, 0, 0)]  # (phase: 0 before it, 1 after "-", 2 integer digits, 3 after ".",
        # 4 fraction digits; negative; integer part; its digits; fraction digits as an integer; their count)

    def _meets(self, negative: int, a: Fraction, b: Fraction) -> bool:
        """Some number of this sign whose magnitude is in [a, b) is in the range (the values being
        (-b, -a] or [a, b)): every lower bound below every upper one (or equal, both taken); with
        `places`, a multiple of `units` of that many decimals between the tightest two."""
        lows = [(-b, False) if negative else (a, True)]
        highs = [(-a, True) if negative else (b, False)]
        if self.lo is not None:
            lows.append((self.lo, not self.lo_open))
        if self.hi is not None:
            highs.append((self.hi, not self.hi_open))
        if self.places is None:
            return all(low < high or low == high and taken and taken_too
                       for low, taken in lows for high, taken_too in highs)
        low, taken = max(lows, key=lambda b: (b[0], not b[1]))  # the tightest bounds
        high, taken_too = min(highs, key=lambda b: (b[0], b[1]))
        unit = Fraction(self.units, 10 ** self.places)  # the first multiple above the lower bound
        first = math.ceil(low / unit) * unit
        first += unit if first == low and not taken else 0
        return first < high or first == high and taken_too

    def any(self) -> bool:
        """Whether any number can be written in the range."""
        top = Fraction(10 ** MAX_INT_DIGITS)
        return self._meets(0, Fraction(0), top) or self._meets(1, Fraction(0), top)

    def _possible(self, local: tuple[int, ...]) -> bool:
        phase, negative, whole, digits, frac, places = local
        if phase == 4:
            unit = Fraction(1, 10 ** places)
            return self._meets(negative, whole + frac * unit, whole + (frac + 1) * unit)
        if phase == 3 or whole == 0:  # after the point, or after a leading 0: only a fraction may follow
            return self._meets(negative, Fraction(whole), Fraction(whole + 1))
        return any(self._meets(negative, Fraction(whole * 10 ** k), Fraction((whole + 1) * 10 ** k))
                   for k in range(MAX_INT_DIGITS - digits + 1))

    def _value(self, local: tuple[int, ...]) -> Fraction:
        _, negative, whole, _, frac, places = local
        v = whole + Fraction(frac, 10 ** places)
        return -v if negative else v

    def step(self, local: tuple[int, ...], byte: int) -> list[tuple]:
        phase, negative, whole, digits, frac, places = local
        nxt: tuple[int, ...] | None = None
        if byte in _DIGITS:
            d = byte - 0x30
            if phase in (0, 1):
                nxt = (2, negative, d, 1, 0, 0)
            elif phase == 2 and whole != 0 and digits < MAX_INT_DIGITS:
                nxt = (2, negative, whole * 10 + d, digits + 1, 0, 0)
            elif phase in (3, 4) and places < (MAX_INT_DIGITS if self.places is None else self.places):
                nxt = (4, negative, whole, digits, frac * 10 + d, places + 1)
        elif byte == 0x2E and phase == 2:
            nxt = (3, negative, whole, digits, 0, 0)
        elif byte == 0x2D and phase == 0:
            return [(STAY, (1, 1, 0, 0, 0, 0))] if self._meets(1, Fraction(0), Fraction(10 ** MAX_INT_DIGITS)) else []
        if nxt is not None:
            return [(STAY, nxt)] if self._possible(nxt) else []
        return [(END,)] if byte not in _DIGITS and self.can_end(local) else []

    def can_end(self, local: tuple[int, ...]) -> bool:
        if local[0] not in (2, 4):
            return False
        v = self._value(local)
        if self.places is not None and (v * 10 ** self.places / self.units).denominator != 1:
            return False
        return ((self.lo is None or v > self.lo or v == self.lo and not self.lo_open)
                and (self.hi is None or v < self.hi or v == self.hi and not self.hi_open))


@dataclass(frozen=True)
class Array:
    """Items of node `item` (None: none), the first ones of the nodes `prefix` (a schema's
    prefixItems), min_items..max_items of them (max None: any number; the count is then kept
    only as far as it matters, so that the parse states repeat)."""

    item: int | None
    min_items: int = 0
    max_items: int | None = None
    prefix: tuple[int, ...] = ()

    def starts(self) -> list[tuple[int, ...]]:
        return [(0, 0, 0)]

    def _more(self, count: int) -> bool:
        return (self.max_items is None or count < self.max_items) and (count < len(self.prefix) or self.item is not None)

    def step(self, local: tuple[int, ...], byte: int) -> list[tuple]:
        phase, count, ws = local  # 0 before [, 1 after [, 2 after an item, 3 after a comma
        if phase == 0:
            return [(STAY, (1, 0, 0))] if byte == 0x5B else []
        if _is_ws(byte):
            w = _ws(ws, byte)
            return [] if w is None else [(STAY, (phase, count, w))]
        if byte == 0x5D and phase in (1, 2) and count >= self.min_items:
            return [(DONE,)]
        if phase == 2:
            return [(STAY, (3, count, 0))] if byte == 0x2C and self._more(count) else []
        if phase == 1 and not self._more(0):
            return []
        nid = self.prefix[count] if count < len(self.prefix) else self.item
        assert nid is not None
        nxt = count + 1 if self.max_items is not None else min(count + 1, max(len(self.prefix), self.min_items))
        return [(PUSH, (2, nxt, 0), nid)]


@dataclass(frozen=True)
class Object:
    """Declared keys (each a Literal node with its value's node) in order, the first `required` of
    them required and the rest optional; then, with `extra`, any further key (a String node,
    `extra_key`) with a value of node `extra`."""

    keys: tuple[tuple[int, int], ...]
    required: int
    extra: int | None = None
    extra_key: int | None = None

    def starts(self) -> list[tuple[int, ...]]:
        return [(0, 0, 0, -1)]

    def step(self, local: tuple[int, ...], byte: int) -> list[tuple]:
        # phase 0 before {, 1 after {, 2 after a value, 3 after a comma, 4 after a key, 5 after the colon;
        # nxt: the first declared key that may still come; chosen: the key whose value comes next
        phase, nxt, ws, chosen = local
        if phase == 0:
            return [(STAY, (1, 0, 0, -1))] if byte == 0x7B else []
        if _is_ws(byte):
            w = _ws(ws, byte)
            return [] if w is None else [(STAY, (phase, nxt, w, chosen))]
        if phase in (1, 3):
            out = self._keys(nxt, byte)
            if phase == 1 and byte == 0x7D and nxt >= self.required:
                out.append((DONE,))
            return out
        if phase == 2:
            if byte == 0x7D and nxt >= self.required:
                return [(DONE,)]
            more = nxt < len(self.keys) or self.extra is not None
            return [(STAY, (3, nxt, 0, -1))] if byte == 0x2C and more else []
        if phase == 4:
            return [(STAY, (5, nxt, 0, chosen))] if byte == 0x3A else []
        value = self.keys[chosen][1] if chosen < len(self.keys) else self.extra
        assert value is not None
        return [(PUSH, (2, nxt, 0, -1), value)]

    def _keys(self, nxt: int, byte: int) -> list[tuple]:
        if byte != 0x22:
            return []
        last = nxt + 1 if nxt < self.required else len(self.keys)  # the required keys one by one, in order
        out: list[tuple] = [(PUSH, (4, j + 1, 0, j), self.keys[j][0]) for j in range(nxt, last)]
        if self.extra is not None and nxt >= self.required and self.extra_key is not None:
            out.append((PUSH, (4, len(self.keys), 0, len(self.keys)), self.extra_key))
        return out


# Grammar.step's "byte" for a whole token (a GBNF token reference's): TOKEN_BASE + its id; byte
# nodes take none of them. OTHER_TOKEN stands for every token no reference names.
TOKEN_BASE = 256
OTHER_TOKEN = 1 << 40


@dataclass(frozen=True)
class TokenRef:
    """One whole token (GBNF's `<[id]>`, or `<text>`: the token that text is): one of `ids`, or
    with `negated` any token but them (`!<[id]>`). `text`: as written, until gbnf.resolve_tokens
    turns it into an id with the model's tokenizer."""

    ids: tuple[int, ...]
    negated: bool = False
    text: str | None = None

    def starts(self) -> list[tuple[int, ...]]:
        return [()]

    def step(self, local: tuple[int, ...], byte: int) -> list[tuple]:
        if byte < TOKEN_BASE:
            return []
        return [(DONE,)] if ((byte - TOKEN_BASE) in self.ids) != self.negated else []


@dataclass(frozen=True)
class Either:
    """Any of the nodes `options` (anyOf, a list of types): followed side by side."""

    options: tuple[int, ...]


@dataclass(frozen=True)
class Root:
    """The whole answer: node `value`, then (a JSON value's) whitespace, or (a GBNF root) nothing."""

    value: int
    trailing_ws: bool = True
    nullable: bool = False  # a GBNF root that may match nothing: complete before any byte

    def starts(self) -> list[tuple[int, ...]]:
        return [(0, 0)]

    def step(self, local: tuple[int, ...], byte: int) -> list[tuple]:
        phase, ws = local
        if phase == 0:
            return [(PUSH, (1, 0), self.value)]
        w = _ws(ws, byte) if _is_ws(byte) and self.trailing_ws else None
        return [] if w is None else [(STAY, (1, w))]


Node = Literal | String | Number | IntRange | NumberRange | Array | Object | TokenRef | Either | Root


class Grammar:
    """Nodes by id, the last one the Root. `step`, `advance` and `complete` work on States."""

    def __init__(self, nodes: list[Node]):
        self.nodes = nodes
        assert isinstance(nodes[-1], Root)
        self.initial: State = frozenset(((len(nodes) - 1, s),) for s in nodes[-1].starts())
        refs = [n for n in nodes if isinstance(n, TokenRef)]
        # the token ids references name (None: no references, tokens are their bytes alone)
        self.named_tokens: frozenset[int] | None = frozenset(i for n in refs for i in n.ids) if refs else None

    def _enter(self, nid: int, seen: frozenset[int] = frozenset()) -> list[Frame]:
        node = self.nodes[nid]
        if isinstance(node, Either):
            if nid in seen:  # anyOf that leads back to itself before any byte: nothing more to follow
                return []
            return [f for o in node.options for f in self._enter(o, seen | {nid})]
        return [(nid, s) for s in node.starts()]

    def _feed(self, stack: Stack, byte: int) -> list[Stack]:
        if not stack:
            return []
        nid, local = stack[-1]
        node = self.nodes[nid]
        assert not isinstance(node, Either)
        out: list[Stack] = []
        for act in node.step(local, byte):
            if act[0] == STAY:
                out.append(stack[:-1] + ((nid, act[1]),))
            elif act[0] == PUSH:
                base = stack[:-1] + ((nid, act[1]),)
                for frame in self._enter(act[2]):
                    out.extend(self._feed(base + (frame,), byte))
            elif act[0] == DONE:
                out.append(stack[:-1])
            else:  # END
                out.extend(self._feed(stack[:-1], byte))
        return out

    def step(self, state: State, byte: int) -> State | None:
        """The parses after `byte` (or, TOKEN_BASE + id, a whole token taken by a reference)."""
        nxt = frozenset(s for stack in state for s in self._feed(stack, byte))
        return nxt or None

    def advance(self, state: State | None, data: bytes) -> State | None:
        for byte in data:
            if state is None:
                return None
            state = self.step(state, byte)
        return state

    def _ended(self, stack: Stack) -> bool:
        """Every frame above the root may end here (a number where its value may; gbnf.py's
        sequences and repetitions where what is left of them may be empty), the root's value read."""
        for nid, local in stack[1:]:
            can_end = getattr(self.nodes[nid], "can_end", None)
            if can_end is None or not can_end(local):
                return False
        root = self.nodes[stack[0][0]] if stack else None
        return isinstance(root, Root) and (stack[0][1][0] == 1 or root.nullable)

    def complete(self, state: State) -> bool:
        """The root value may end here (whitespace may still follow)."""
        return any(self._ended(stack) for stack in state)

    def in_free_string(self, state: State) -> bool:
        """Every parse is inside a string that takes any text, not after a backslash nor inside a character."""
        for stack in state:
            nid, local = stack[-1]
            node = self.nodes[nid]
            if not (isinstance(node, String) and node.free and local[0] == 1 and local[2] == 0 and local[3] == 0):
                return False
        return True


def any_value(nodes: list[Node]) -> int:
    """Adds the nodes of any JSON value to `nodes`; returns its id (the Either)."""
    base = len(nodes)
    # base: Either; +1 object; +2 array; +3 string; +4 number; +5 true/false/null
    nodes.extend([Either((base + 1, base + 2, base + 3, base + 4, base + 5)),
                  Object((), 0, extra=base, extra_key=base + 3), Array(base), String(), Number(),
                  Literal((b"true", b"false", b"null"))])
    return base


def any_object() -> Grammar:
    """`format="json"`: one JSON object, any keys and values (llama.cpp's json.gbnf)."""
    nodes: list[Node] = []
    value = any_value(nodes)
    nodes.append(Root(value + 1))
    return Grammar(nodes)
