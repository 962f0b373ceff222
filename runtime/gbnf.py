"""GBNF grammars (llama.cpp's `--grammar` / `--grammar-file`) as json_grammar.py's byte-level
Grammar, so that a generation keeps to them token by token as it keeps to a JSON schema.

The language is llama.cpp's grammar-parser's: rules `name ::= alternatives` (the answer is
`root`), alternatives split by `|`, sequences of "literals" (escapes \\t \\n \\r \\\\ \\" \\[ \\]
\\xHH \\uHHHH \\UHHHHHHHH), character classes `[a-z0-9_]` and `[^"\\\\]` (over Unicode characters,
read as UTF-8), `.` (any character), rule names, groups `( ... )`, and the repetitions `*` `+` `?`
`{m}` `{m,}` `{m,n}`; tokens, whole: `<[151648]>` by id, `<|box_start|>` by its text (what the
model's tokenizer makes one token of; resolve_tokens, when the grammar meets a model), and
`!<[id]>` / `!<text>` for any token but that one (a token's bytes then are not read); `#`
comments; a rule goes on over new lines inside a group or after `|` or `::=`. Nothing may follow the root (llama.cpp's grammars end there too). Refused, with the
line or rule named: an undefined rule, no `root`, left recursion (a rule that can reach itself
before a byte), and an unbounded repetition of something that can be empty.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

from .json_grammar import _UTF8_LEADS, DONE, END, PUSH, STAY, Either, Grammar, Literal, Node, Root, TokenRef


# llama.cpp's grammars/json.gbnf, in its layout (what format="json" follows natively, json_grammar.py)
JSON_GBNF = r'''
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= | " " | "\n" [ \t]{0,20}
'''


class GrammarError(ValueError):
    """A GBNF grammar qvl cannot read or follow; one line, naming the line or the rule."""


@dataclass(frozen=True)
class Seq:
    """Items in order; `tail`: how many of the last items may be empty (where the sequence may end)."""

    items: tuple[int, ...]
    tail: int = 0

    def starts(self) -> list[tuple[int, ...]]:
        return [(0,)]

    def step(self, local: tuple[int, ...], byte: int) -> list[tuple]:
        i = local[0]
        return [(PUSH, (i + 1,), self.items[i])] if i < len(self.items) else [(END,)]

    def can_end(self, local: tuple[int, ...]) -> bool:
        return local[0] >= len(self.items) - self.tail


@dataclass(frozen=True)
class Repeat:
    """`item` min..max times (max None: any number; the count is then kept only up to min, so
    that the parse states repeat)."""

    item: int
    min: int
    max: int | None

    def starts(self) -> list[tuple[int, ...]]:
        return [(0,)]

    def step(self, local: tuple[int, ...], byte: int) -> list[tuple]:
        n = local[0]
        out: list[tuple] = []
        if self.max is None or n < self.max:
            out.append((PUSH, (min(n + 1, self.min) if self.max is None else n + 1,), self.item))
        if n >= self.min:
            out.append((END,))
        return out

    def can_end(self, local: tuple[int, ...]) -> bool:
        return local[0] >= self.min


@dataclass(frozen=True)
class CharSet:
    """One Unicode character (its UTF-8 bytes) in `ranges` (code point pairs), or with `negated`
    one not in them; `.` is the negated empty set."""

    ranges: tuple[tuple[int, int], ...]
    negated: bool = False

    def starts(self) -> list[tuple[int, ...]]:
        return [(0, 0, 0x80, 0xBF)]

    def _has(self, cp: int) -> bool:
        return any(lo <= cp <= hi for lo, hi in self.ranges) != self.negated

    def _may(self, lo: int, hi: int) -> bool:
        """Some character of lo..hi is in the set: a character's first bytes are taken only where
        one it may be is (a lead byte for [0-9] would leave the answer nowhere to go)."""
        if not self.negated:
            return any(a <= hi and lo <= b for a, b in self.ranges)
        for a, b in sorted(self.ranges):  # negated: some character of lo..hi the ranges leave out
            if a > lo:
                return True
            lo = max(lo, b + 1)
            if lo > hi:
                return False
        return True

    def step(self, local: tuple[int, ...], byte: int) -> list[tuple]:
        need, cp, lo, hi = local
        if need == 0:
            if byte < 0x80:
                return [(DONE,)] if self._has(byte) else []
            if byte not in _UTF8_LEADS:
                return []
            n, (first_lo, first_hi) = _UTF8_LEADS[byte]
            cp = byte & (0x3F >> n)
        else:
            if not lo <= byte <= hi:
                return []
            n, first_lo, first_hi = need - 1, 0x80, 0xBF
            cp = cp << 6 | byte & 0x3F
            if n == 0:
                return [(DONE,)] if self._has(cp) else []
        shift = 6 * (n - 1)  # the characters these bytes may still become: the next byte in first_lo..first_hi
        if not self._may((cp << 6 | first_lo & 0x3F) << shift, ((cp << 6 | first_hi & 0x3F) + 1 << shift) - 1):
            return []
        return [(STAY, (n, cp, first_lo, first_hi))]


class _Parser:
    """llama.cpp's grammar syntax, read into nodes; rules become Either nodes of Seq nodes."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.nodes: list[Node] = []
        self.rules: dict[str, int] = {}  # rule name -> its Either node (made at its first mention)
        self.defined: set[str] = set()
        self.mentioned: dict[str, int] = {}  # rule name -> the line it was first used on

    def fail(self, message: str) -> GrammarError:
        line = self.text.count("\n", 0, self.pos) + 1
        return GrammarError(f"grammar line {line}: {message}")

    def space(self, newlines: bool) -> None:
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c == "#":
                while self.pos < len(self.text) and self.text[self.pos] not in "\r\n":
                    self.pos += 1
            elif c in " \t" or (newlines and c in "\r\n"):
                self.pos += 1
            else:
                return

    def name(self) -> str:
        start = self.pos
        while self.pos < len(self.text) and (self.text[self.pos].isalnum() or self.text[self.pos] in "-_"):
            self.pos += 1
        if start == self.pos:
            raise self.fail(f"expected a rule name at {self.text[self.pos:self.pos + 10]!r}")
        return self.text[start:self.pos]

    def rule_node(self, name: str) -> int:
        if name not in self.rules:
            self.rules[name] = len(self.nodes)
            self.nodes.append(Either(()))  # filled in when the rule is read
            self.mentioned[name] = self.text.count("\n", 0, self.pos) + 1
        return self.rules[name]

    def add(self, node: Node) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def char(self) -> int:
        """One character of a literal or class, its escape read: the code point."""
        if self.pos >= len(self.text):
            raise self.fail("unexpected end of grammar")
        c = self.text[self.pos]
        if c != "\\":
            self.pos += 1
            return ord(c)
        e = self.text[self.pos + 1:self.pos + 2]
        hex_digits = {"x": 2, "u": 4, "U": 8}.get(e)
        if hex_digits:
            digits = self.text[self.pos + 2:self.pos + 2 + hex_digits]
            if len(digits) != hex_digits or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.fail(f"escape \\{e} wants {hex_digits} hex digits")
            self.pos += 2 + hex_digits
            return int(digits, 16)
        simple = {"t": 9, "n": 10, "r": 13, "\\": 92, '"': 34, "[": 91, "]": 93, "-": 45, "^": 94}
        if e not in simple:
            raise self.fail(f"unknown escape \\{e}")
        self.pos += 2
        return simple[e]

    def literal(self) -> int:
        self.pos += 1  # the opening quote
        chars = []
        while self.pos < len(self.text) and self.text[self.pos] != '"':
            if self.text[self.pos] in "\r\n":
                raise self.fail("a literal ends on its own line")
            chars.append(self.char())
        if self.pos >= len(self.text):
            raise self.fail("unterminated literal")
        self.pos += 1
        data = "".join(map(chr, chars)).encode("utf-8", errors="surrogatepass")
        return self.add(Literal((data,))) if data else self.add(Seq(()))

    def char_class(self) -> int:
        self.pos += 1  # [
        negated = self.text[self.pos:self.pos + 1] == "^"
        self.pos += negated
        ranges = []
        while self.pos < len(self.text) and self.text[self.pos] != "]":
            lo = self.char()
            hi = lo
            if self.text[self.pos:self.pos + 1] == "-" and self.text[self.pos + 1:self.pos + 2] not in ("]", ""):
                self.pos += 1
                hi = self.char()
                if hi < lo:
                    raise self.fail(f"character range {chr(lo)!r}-{chr(hi)!r} runs backwards")
            ranges.append((lo, hi))
        if self.pos >= len(self.text):
            raise self.fail("unterminated character class")
        self.pos += 1
        return self.add(CharSet(tuple(ranges), negated))

    def token_ref(self) -> int:
        """`<[id]>` or `<text>`, after a `!` for any token but it."""
        negated = self.text[self.pos] == "!"
        self.pos += negated
        if self.text[self.pos:self.pos + 1] != "<":
            raise self.fail("expected '<' after '!' (a token: !<[id]> or !<text>)")
        if self.text.startswith("<[", self.pos):
            self.pos += 2
            token = self.number()
            if not self.text.startswith("]>", self.pos):
                raise self.fail("expected ']>' after a token id")
            self.pos += 2
            return self.add(TokenRef((token,), negated))
        end = self.text.find(">", self.pos + 1)
        if end < 0 or any(c in "\r\n" for c in self.text[self.pos:end]):
            raise self.fail("a token <...> ends on its line with '>'")
        text = self.text[self.pos:end + 1]
        self.pos = end + 1
        return self.add(TokenRef((), negated, text))

    def repeat_bounds(self) -> tuple[int, int | None]:
        self.pos += 1  # {
        self.space(True)
        lo = self.number()
        self.space(True)
        hi: int | None = lo
        if self.text[self.pos:self.pos + 1] == ",":
            self.pos += 1
            self.space(True)
            hi = self.number() if self.text[self.pos:self.pos + 1].isdigit() else None
            self.space(True)
        if self.text[self.pos:self.pos + 1] != "}":
            raise self.fail("expected '}' after a repetition's bounds")
        self.pos += 1
        if hi is not None and hi < lo:
            raise self.fail(f"repetition {{{lo},{hi}}}: the most below the least")
        return lo, hi

    def number(self) -> int:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos].isdigit():
            self.pos += 1
        if start == self.pos:
            raise self.fail("expected a number")
        return int(self.text[start:self.pos])

    def sequence(self, nested: bool) -> int:
        items: list[int] = []
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c == '"':
                item = self.literal()
            elif c == "[":
                item = self.char_class()
            elif c == ".":
                self.pos += 1
                item = self.add(CharSet((), True))
            elif c == "(":
                self.pos += 1
                self.space(True)
                item = self.alternatives(True)
                if self.text[self.pos:self.pos + 1] != ")":
                    raise self.fail("expected ')'")
                self.pos += 1
            elif c == "<" or c == "!":
                item = self.token_ref()
            elif c.isalnum() or c in "-_":
                item = self.rule_node(self.name())
            else:
                break
            self.space(nested)
            while self.pos < len(self.text) and self.text[self.pos] in "*+?{":
                op = self.text[self.pos]
                bounds = self.repeat_bounds() if op == "{" else {"*": (0, None), "+": (1, None), "?": (0, 1)}[op]
                self.pos += op != "{"
                item = self.add(Repeat(item, *bounds))
                self.space(nested)
            items.append(item)
        return items[0] if len(items) == 1 else self.add(Seq(tuple(items)))

    def alternatives(self, nested: bool) -> int:
        options = [self.sequence(nested)]
        while True:
            before = self.pos
            self.space(True)  # an alternative may start a line of its own with `|`
            if self.text[self.pos:self.pos + 1] != "|":
                self.pos = before
                break
            self.pos += 1
            self.space(True)
            options.append(self.sequence(nested))
        return options[0] if len(options) == 1 else self.add(Either(tuple(options)))

    def parse(self) -> None:
        self.space(True)
        while self.pos < len(self.text):
            name = self.name()
            self.space(False)
            if not self.text.startswith("::=", self.pos):
                raise self.fail(f"expected '::=' after rule name {name!r}")
            self.pos += 3
            self.space(True)
            if name in self.defined:
                raise self.fail(f"rule {name!r} defined twice")
            body = self.alternatives(False)
            self.nodes[self.rule_node(name)] = Either((body,))
            self.defined.add(name)
            if self.pos < len(self.text) and self.text[self.pos] not in "\r\n":
                raise self.fail(f"unexpected {self.text[self.pos:self.pos + 10]!r}")
            self.space(True)


def _nullable(nodes: list[Node]) -> list[bool]:
    """Which nodes can match nothing (a fixed point over the rules)."""
    empty = [False] * len(nodes)
    changed = True
    while changed:
        changed = False
        for i, n in enumerate(nodes):
            now = (isinstance(n, Seq) and all(empty[j] for j in n.items)
                   or isinstance(n, Either) and any(empty[j] for j in n.options)
                   or isinstance(n, Repeat) and (n.min == 0 or empty[n.item]))
            if now and not empty[i]:
                empty[i] = changed = True
    return empty


def _first(node: Node, empty: list[bool]) -> list[int]:
    """The nodes `node` may enter before it reads a byte."""
    if isinstance(node, Either):
        return list(node.options)
    if isinstance(node, Repeat):
        return [node.item]
    if isinstance(node, Seq):
        out = []
        for j in node.items:
            out.append(j)
            if not empty[j]:
                break
        return out
    return []


def parse_gbnf(text: str) -> Grammar:
    """A GBNF grammar's text as a Grammar whose answer is its `root` rule; a GrammarError if it
    cannot be read or followed."""
    p = _Parser(text)
    p.parse()
    if "root" not in p.defined:
        raise GrammarError("grammar: no root rule (root ::= ...)")
    for name, line in p.mentioned.items():
        if name not in p.defined:
            raise GrammarError(f"grammar line {line}: undefined rule {name!r}")
    nodes = p.nodes
    empty = _nullable(nodes)
    names = {nid: name for name, nid in p.rules.items()}
    for i, n in enumerate(nodes):
        if isinstance(n, Seq):
            tail = 0
            while tail < len(n.items) and empty[n.items[len(n.items) - 1 - tail]]:
                tail += 1
            nodes[i] = Seq(n.items, tail)
        if isinstance(n, Repeat) and n.max is None and empty[n.item]:
            raise GrammarError(f"grammar: a repetition ({'*' if n.min == 0 else '+'}) of something that can be "
                               "empty never has to end; make its item read at least one character")
    _no_left_recursion(nodes, empty, names)
    nodes.append(Root(p.rules["root"], trailing_ws=False, nullable=empty[p.rules["root"]]))
    return Grammar(nodes)


def embed_gbnf(text: str, nodes: list[Node]) -> int:
    """The GBNF grammar `text`'s nodes appended to `nodes` (another grammar's: json_schema.py's
    string formats and patterns), their ids moved along; returns its root rule's node."""
    g = parse_gbnf(text)
    root = g.nodes[-1]
    assert isinstance(root, Root)
    base = len(nodes)
    for n in g.nodes[:-1]:
        if isinstance(n, Seq):
            n = Seq(tuple(i + base for i in n.items), n.tail)
        elif isinstance(n, Repeat):
            n = Repeat(n.item + base, n.min, n.max)
        elif isinstance(n, Either):
            n = Either(tuple(i + base for i in n.options))
        nodes.append(n)
    return root.value + base


def resolve_tokens(grammar: Grammar, tokenizer: Tokenizer) -> Grammar:
    """`grammar` with its `<text>` tokens made ids by `tokenizer` (as llama.cpp does, the text
    must be one token, special ones included) and every id checked against the vocabulary; a
    GrammarError names the one at fault. A grammar without token references comes back as it is."""
    if grammar.named_tokens is None:
        return grammar
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    nodes = list(grammar.nodes)
    for i, node in enumerate(nodes):
        if not isinstance(node, TokenRef):
            continue
        if node.text is not None:
            ids = tokenizer.encode(node.text, add_special_tokens=False).ids
            if len(ids) != 1:
                raise GrammarError(f"grammar: token {node.text} is {len(ids)} tokens of this model's vocabulary, "
                                   "not one (write <[id]> for a token by its id)")
            nodes[i] = TokenRef((ids[0],), node.negated)
        elif any(not 0 <= t < size for t in node.ids):
            raise GrammarError(f"grammar: token <[{node.ids[0]}]> is not in this model's vocabulary "
                               f"(ids 0 to {size - 1})")
    return Grammar(nodes)


def _no_left_recursion(nodes: list[Node], empty: list[bool], names: dict[int, str]) -> None:
    """A rule that reaches itself before reading a byte would be entered without end."""
    state = [0] * len(nodes)  # 0 unseen, 1 on the path, 2 done

    def visit(i: int) -> None:
        state[i] = 1
        for j in _first(nodes[i], empty):
            if state[j] == 1:
                raise GrammarError(f"grammar: left recursion through rule {names.get(j, names.get(i, '?'))!r} "
                                   "(it reaches itself before reading a character)")
            if state[j] == 0:
                visit(j)
        state[i] = 2

    for i in range(len(nodes)):
        if state[i] == 0:
            visit(i)
