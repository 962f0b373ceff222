"""Go's text/template, the part Ollama's TEMPLATEs use: parsed once, executed over dicts and lists.

    {{ .Field.Sub }}  {{ $ }}  {{ $x := pipeline }}  {{ $x = pipeline }}  {{ f a b | g }}  {{ (f a).Field }}
    {{ if p }} ... {{ else if q }} ... {{ else }} ... {{ end }}
    {{ range $i, $v := p }} ... {{ break }} {{ continue }} ... {{ else }} ... {{ end }}     {{ with p }} ... {{ end }}
    {{- trims the whitespace before; -}} the whitespace after       {{/* a comment */}}
    functions: and or not eq ne lt le gt ge len index slice print printf println json

Values are Python's: a dict is a struct or a map (a missing key is None, printed `<no value>`), a
list a slice; truth as Go's (false, 0, "", None and empty lists and dicts are false). `define`,
`template` and `block` are refused (TemplateError), as are other functions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class TemplateError(ValueError):
    """A template that does not parse, or fails as it runs: the message says where."""


# --- nodes --------------------------------------------------------------------------------------

@dataclass
class Field:
    names: list[str]  # .A.B: ["A", "B"]; "." alone: []


@dataclass
class Variable:
    name: str  # "$" or "$x"
    names: list[str] = field(default_factory=list)  # $x.A.B


@dataclass
class Literal:
    value: Any


@dataclass
class Identifier:
    name: str  # a function


@dataclass
class Command:
    args: list[Any]  # Field, Variable, Literal, Identifier, Pipe (parenthesized), Chain


@dataclass
class Chain:
    node: Any  # (pipeline).A.B
    names: list[str]


@dataclass
class Pipe:
    cmds: list[Command]
    decl: list[str] = field(default_factory=list)  # $x or $i, $v
    assign: bool = False  # `=` (to a declared variable) rather than `:=`


@dataclass
class Text:
    text: str


@dataclass
class Action:
    pipe: Pipe


@dataclass
class Branch:
    kind: str  # if, range, with
    pipe: Pipe
    body: list[Any]
    other: list[Any] | None = None  # else (an `else if` is one Branch in it)


@dataclass
class Loop:
    kind: str  # break, continue


# --- lexing and parsing ---------------------------------------------------------------------------

_ACTION = re.compile(r"\{\{(-[ \t\r\n])?(.*?)([ \t\r\n]-)?\}\}", re.S)
_TOKEN = re.compile(r"""\s*(?:
    (?P<str>"(?:[^"\\]|\\.)*") | (?P<raw>`[^`]*`) | (?P<num>-?\d+(?:\.\d+)?) |
    (?P<var>\$\w*(?:\.\w+)*) | (?P<field>(?:\.\w+)+|\.) | (?P<chain>\)(?:\.\w+)+) |
    (?P<decl>:=|=) | (?P<punct>[(),|]) | (?P<ident>\w+)
    )""", re.X)
_COMMENT = re.compile(r"/\*.*\*/", re.S)
_SPACE = " \t\r\n"  # what a trim marker trims: Go's white space
_KEYWORDS = ("if", "else", "end", "range", "with", "break", "continue", "define", "template", "block")


def _tokens(source: str, where: str) -> list[tuple[str, str]]:
    out, at = [], 0
    source = source.rstrip()
    while at < len(source):
        m = _TOKEN.match(source, at)
        if m is None or m.end() == at:
            raise TemplateError(f"{where}: cannot read {source[at:].strip()[:20]!r}")
        kind = m.lastgroup
        assert kind is not None
        text = m.group(kind)
        if kind == "chain":  # ")" then the fields after it
            out += [("punct", ")"), ("chainfields", text[1:])]
        else:
            out.append((kind, text))
        at = m.end()
    return out


def _line(text: str, at: int) -> str:
    return f"line {text.count(chr(10), 0, at) + 1}"


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.items: list[tuple[str, Any, str]] = []  # ("text", str, where) or ("action", tokens, where)
        at, trim_next = 0, False
        for m in _ACTION.finditer(text):
            chunk = text[at:m.start()]
            if trim_next:
                chunk = chunk.lstrip(_SPACE)
            if m.group(1):
                chunk = chunk.rstrip(_SPACE)
            if chunk:
                self.items.append(("text", chunk, ""))
            where = _line(text, m.start())
            body = m.group(2)
            if not _COMMENT.fullmatch(body.strip()):
                self.items.append(("action", _tokens(body, where), where))
            trim_next, at = bool(m.group(3)), m.end()
        rest = text[at:]
        if "{{" in rest:
            raise TemplateError(f"{_line(text, at + rest.index('{{'))}: an unclosed action ({{{{ without }}}})")
        if trim_next:
            rest = rest.lstrip(_SPACE)
        if rest:
            self.items.append(("text", rest, ""))
        self.pos = 0

    def parse(self) -> list[Any]:
        nodes, stop = self._list()
        if stop is not None:
            raise TemplateError(f"{stop[2]}: unexpected {{{{{stop[1][0][1]}}}}}")
        return nodes

    def _list(self) -> tuple[list[Any], tuple | None]:
        """Nodes up to an {{else}} or {{end}} (returned as the stop) or the end (None)."""
        nodes: list[Any] = []
        while self.pos < len(self.items):
            kind, value, where = self.items[self.pos]
            self.pos += 1
            if kind == "text":
                nodes.append(Text(value))
                continue
            if not value:
                raise TemplateError(f"{where}: an empty action {{{{}}}}")
            head = value[0][1] if value[0][0] == "ident" else None
            if head in ("else", "end"):
                return nodes, (kind, value, where)
            if head in ("if", "range", "with"):
                nodes.append(self._branch(head, value[1:], where))
            elif head in ("break", "continue"):
                nodes.append(Loop(head))
            elif head in ("define", "template", "block"):
                raise TemplateError(f"{where}: {{{{{head}}}}} is not supported")
            else:
                nodes.append(Action(_pipe(value, where)))
        return nodes, None

    def _branch(self, kind: str, tokens: list, where: str) -> Branch:
        if not tokens:
            raise TemplateError(f"{where}: {{{{{kind}}}}} without a pipeline")
        node = Branch(kind, _pipe(tokens, where), [])
        node.body, stop = self._list()
        if stop is None:
            raise TemplateError(f"{where}: {{{{{kind}}}}} without {{{{end}}}}")
        rest = stop[1][1:]
        if stop[1][0][1] == "else":
            if rest and rest[0] == ("ident", "if") and kind == "if":  # else if: one more branch, sharing the end
                node.other = [self._branch("if", rest[1:], stop[2])]
                return node
            if rest:
                raise TemplateError(f"{stop[2]}: unexpected {rest[0][1]!r} after else")
            node.other, stop = self._list()
            if stop is None or stop[1][0][1] != "end":
                raise TemplateError(f"{where}: {{{{{kind}}}}} without {{{{end}}}}")
        return node


def _pipe(tokens: list[tuple[str, str]], where: str) -> Pipe:
    decl: list[str] = []
    assign = False
    for n in (1, 2):  # $x := ... or $i, $v := ...
        names = tokens[0:2 * n - 1:2]
        seps = tokens[1:2 * n - 1:2]
        if (len(tokens) > 2 * n - 1 and all(k == "var" for k, _ in names) and all(s == ("punct", ",") for s in seps)
                and tokens[2 * n - 1][0] == "decl"):
            decl, assign = [v for _, v in names], tokens[2 * n - 1][1] == "="
            tokens = tokens[2 * n:]
            break
    cmds: list[Command] = []
    args: list[Any] = []
    i = 0
    groups: list[tuple[list, list]] = []
    while i < len(tokens):
        kind, text = tokens[i]
        i += 1
        if kind == "punct" and text == "(":
            groups.append((cmds, args))
            cmds, args = [], []
            continue
        if kind == "punct" and text == ")":
            if not groups:
                raise TemplateError(f"{where}: unexpected )")
            if not cmds and not args:
                raise TemplateError(f"{where}: missing value for parenthesized pipeline")
            inner = Pipe(cmds + [Command(args)] if args else cmds)
            cmds, args = groups.pop()
            if i < len(tokens) and tokens[i][0] == "chainfields":
                args.append(Chain(inner, tokens[i][1].split(".")[1:]))
                i += 1
            else:
                args.append(inner)
            continue
        if kind == "punct" and text == "|":
            if not args:
                raise TemplateError(f"{where}: a | with nothing before it")
            cmds.append(Command(args))
            args = []
            continue
        if kind == "punct" or kind == "decl":
            raise TemplateError(f"{where}: unexpected {text!r}")
        args.append(_operand(kind, text, where))
    if groups:
        raise TemplateError(f"{where}: unclosed (")
    if not args:
        raise TemplateError(f"{where}: missing a value")
    return Pipe(cmds + [Command(args)], decl, assign)


def _operand(kind: str, text: str, where: str) -> Any:
    if kind == "str":
        try:
            return Literal(json.loads(text))
        except ValueError:  # Go's escapes that JSON lacks (\x41, \'): not read here
            raise TemplateError(f"{where}: cannot read the string {text}") from None
    if kind == "raw":
        return Literal(text[1:-1])
    if kind == "num":
        return Literal(float(text) if "." in text else int(text))
    if kind == "var":
        name, *names = text.split(".")
        return Variable(name, names)
    if kind == "field":
        return Field([] if text == "." else text.split(".")[1:])
    if text in ("true", "false"):
        return Literal(text == "true")
    if text == "nil":
        return Literal(None)
    if text in _KEYWORDS:
        raise TemplateError(f"{where}: unexpected {text!r}")
    if text not in FUNCTIONS:
        raise TemplateError(f"{where}: function {text!r} not defined")
    return Identifier(text)


def parse(text: str) -> list[Any]:
    """The template's nodes (a TemplateError names the line at fault)."""
    return _Parser(text).parse()


# --- running ----------------------------------------------------------------------------------

def truth(v: Any) -> bool:
    return v is not None and v is not False and v != 0 and not (isinstance(v, (str, list, dict, tuple)) and not v)


def show(v: Any) -> str:
    """A value printed as Go's fmt.Sprint prints it."""
    if v is None:
        return "<no value>"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, (list, tuple)):
        return "[" + " ".join(show(x) for x in v) + "]"
    if isinstance(v, dict):
        return "map[" + " ".join(f"{k}:{show(x)}" for k, x in sorted(v.items())) + "]"
    return str(v)


def _sprint(*args: Any) -> str:  # fmt.Sprint: a space between operands when neither is a string
    out = ""
    for i, a in enumerate(args):
        if i and not isinstance(a, str) and not isinstance(args[i - 1], str):
            out += " "
        out += show(a)
    return out


def _printf(fmt: str, *args: Any) -> str:
    it = iter(args)

    def one(m: re.Match) -> str:
        if m.group(0) == "%%":
            return "%"
        v = next(it, None)
        return json.dumps(v) if m.group(1) == "q" else show(v)
    return re.sub(r"%([svdqt])|%%", one, fmt)


def _compare(op: Callable[[Any, Any], bool]) -> Callable[..., bool]:
    def f(a: Any, b: Any) -> bool:
        if type(a) is not type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))):
            raise TemplateError(f"incompatible types for comparison: {show(a)} and {show(b)}")
        return op(a, b)
    return f


def _index(v: Any, *keys: Any) -> Any:
    for k in keys:
        if isinstance(v, dict):
            v = v.get(k)
        elif isinstance(v, (list, tuple, str)) and isinstance(k, int) and 0 <= k < len(v):
            v = v[k]
        else:
            raise TemplateError(f"index {show(k)} out of range")
    return v


def _slice(v: Any, *bounds: int) -> Any:
    if not isinstance(v, (list, tuple, str)) or len(bounds) > 2:
        raise TemplateError("slice: a list or a string, and at most 2 indexes")
    lo, hi = (list(bounds) + [0, len(v)][len(bounds):])[:2]
    if not 0 <= lo <= hi <= len(v):
        raise TemplateError(f"slice: indexes {lo}:{hi} out of range")
    return v[lo:hi]


def _length(v: Any) -> int:
    if not isinstance(v, (list, tuple, str, dict)):
        raise TemplateError(f"len of {show(v)}")
    return len(v)


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "eq": lambda a, *bs: any(_compare(lambda x, y: x == y)(a, b) for b in bs),
    "ne": _compare(lambda a, b: a != b), "lt": _compare(lambda a, b: a < b), "le": _compare(lambda a, b: a <= b),
    "gt": _compare(lambda a, b: a > b), "ge": _compare(lambda a, b: a >= b),
    "and": lambda *a: None, "or": lambda *a: None,  # short-circuit: _Run.command runs them
    "not": lambda a: not truth(a), "len": _length, "index": _index, "slice": _slice,
    "print": _sprint, "println": lambda *a: " ".join(show(x) for x in a) + "\n", "printf": _printf,
    "json": lambda v: _go_json(v),
}


def _go_json(v: Any) -> str:
    """Go's json.Marshal: compact, UTF-8, with <, >, & and the line separators escaped."""
    text = json.dumps(v, ensure_ascii=False, separators=(",", ":"), sort_keys=True)  # a map's keys sorted
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                    ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


class _Stop(Exception):
    def __init__(self, kind: str):
        self.kind = kind


class _Run:
    def __init__(self, data: Any):
        self.data = data
        self.scopes: list[dict[str, Any]] = [{"$": data}]
        self.out: list[str] = []

    def nodes(self, nodes: list[Any], dot: Any) -> None:
        self.scopes.append({})
        try:
            for n in nodes:
                self.node(n, dot)
        finally:
            self.scopes.pop()

    def node(self, n: Any, dot: Any) -> None:
        if isinstance(n, Text):
            self.out.append(n.text)
        elif isinstance(n, Action):
            v = self.pipe(n.pipe, dot)
            if not n.pipe.decl:
                self.out.append(show(v))
        elif isinstance(n, Loop):
            raise _Stop(n.kind)
        elif n.kind == "range":
            self.range(n, dot)
        else:
            v = self.pipe(n.pipe, dot)
            if truth(v):
                self.nodes(n.body, v if n.kind == "with" else dot)
            elif n.other is not None:
                self.nodes(n.other, dot)

    def range(self, n: Branch, dot: Any) -> None:
        self.scopes.append({})
        try:
            v = self.pipe(Pipe(n.pipe.cmds), dot)
            if isinstance(v, dict):
                pairs = [(k, v[k]) for k in sorted(v)]
            elif isinstance(v, (list, tuple)):
                pairs = list(enumerate(v))
            elif isinstance(v, int) and not isinstance(v, bool):
                pairs = [(i, i) for i in range(v)]
            elif v is None:
                pairs = []
            else:
                raise TemplateError(f"range can't iterate over {show(v)}")
            for key, item in pairs:
                names = n.pipe.decl
                if len(names) == 1:
                    self.scopes[-1][names[0]] = item
                elif len(names) == 2:
                    self.scopes[-1][names[0]], self.scopes[-1][names[1]] = key, item
                try:
                    self.nodes(n.body, item)
                except _Stop as s:
                    if s.kind == "break":
                        break
            if not pairs and n.other is not None:
                self.nodes(n.other, dot)
        finally:
            self.scopes.pop()

    def pipe(self, p: Pipe, dot: Any) -> Any:
        v: Any = None
        for i, cmd in enumerate(p.cmds):
            v = self.command(cmd, dot, [v] if i else [])
        if p.decl:
            if p.assign:
                scope = next((s for s in reversed(self.scopes) if p.decl[0] in s), None)
                if scope is None:
                    raise TemplateError(f"undefined variable: {p.decl[0]}")
                scope[p.decl[0]] = v
            else:
                self.scopes[-1][p.decl[-1]] = v
        return v

    def command(self, cmd: Command, dot: Any, piped: list[Any]) -> Any:
        head = cmd.args[0]
        if isinstance(head, Identifier):
            if head.name in ("and", "or"):  # short-circuit, returning the deciding argument
                values = [lambda a=a: self.arg(a, dot) for a in cmd.args[1:]] + [lambda p=p: p for p in piped]
                if not values:
                    raise TemplateError(f"wrong number of arguments to {head.name}: 0")
                v: Any = None
                for get in values:
                    v = get()
                    if truth(v) != (head.name == "and"):
                        return v
                return v
            args = [self.arg(a, dot) for a in cmd.args[1:]] + piped
            try:
                return FUNCTIONS[head.name](*args)
            except TypeError:
                raise TemplateError(f"wrong number of arguments to {head.name}: {len(args)}") from None
        if len(cmd.args) > 1 or piped:
            raise TemplateError(f"{_name(head)} is not a function: it takes no arguments")
        if isinstance(head, Literal) and head.value is None:
            raise TemplateError("nil is not a command")
        return self.arg(head, dot)

    def arg(self, a: Any, dot: Any) -> Any:
        if isinstance(a, Literal):
            return a.value
        if isinstance(a, Field):
            return _fields(dot, a.names)
        if isinstance(a, Variable):
            scope = next((s for s in reversed(self.scopes) if a.name in s), None)
            if scope is None:
                raise TemplateError(f"undefined variable: {a.name}")
            return _fields(scope[a.name], a.names)
        if isinstance(a, Pipe):
            return self.pipe(a, dot)
        if isinstance(a, Chain):
            return _fields(self.pipe(a.node, dot), a.names)
        if isinstance(a, Identifier):
            return self.command(Command([a]), dot, [])
        raise TemplateError(f"cannot evaluate {a!r}")


def _name(a: Any) -> str:
    if isinstance(a, Field):
        return "." + ".".join(a.names)
    return getattr(a, "name", repr(a))


def _fields(v: Any, names: list[str]) -> Any:
    for name in names:
        if v is None:
            return None
        if not isinstance(v, dict):
            raise TemplateError(f"can't evaluate field {name} in {show(v)}")
        v = v.get(name)
    return v


def execute(nodes: list[Any], data: Any) -> str:
    run = _Run(data)
    try:
        run.nodes(nodes, data)
    except _Stop as s:
        raise TemplateError(f"{{{{{s.kind}}}}} outside a range") from None
    return "".join(run.out)
