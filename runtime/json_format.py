"""`format`: answers that are one JSON object (Ollama's `format: "json"`, OpenAI's
`response_format: json_object`, llama.cpp's json.gbnf) or what a JSON schema allows (Ollama's
`format: {...}`, OpenAI's `json_schema`), chosen token by token.

The grammars (json_grammar.py, json_schema.py) read bytes, as Qwen2's tokens are byte-level BPE
(one may end inside a UTF-8 character). `JsonConstraint` says which tokens keep the answer a
prefix of what the grammar allows, computing what a token does to a parse state once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer

from .json_grammar import OTHER_TOKEN, TOKEN_BASE, Grammar, State, any_object
from .json_schema import schema_grammar


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet backwards: the character a token's text uses for each byte."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


BYTE_OF = byte_decoder()


def piece_bytes(text: str) -> bytes | None:
    """The bytes a vocabulary token's text stands for (None: not byte-level text)."""
    return bytes(BYTE_OF[c] for c in text) if all(c in BYTE_OF for c in text) else None


@dataclass(frozen=True)
class TokenTable:
    """The vocabulary as bytes, made once per model (152k tokens: ~1 s)."""

    pieces: list[bytes | None]  # each id's bytes; None: an added token, never allowed as text
    first: torch.Tensor  # each id's first byte, 256 for none
    pairs: list[bytes]  # the distinct first two bytes of the tokens of two bytes or more
    pair: torch.Tensor  # each id's index into `pairs`, -1 for a token shorter than two bytes
    plain: torch.Tensor  # bool: whole UTF-8 characters a string may hold as they are (no quote, backslash, control)
    n_tokens: int  # ids below it are tokens (the rest of the logits are padding)


def _plain(piece: bytes) -> bool:
    if any(b < 0x20 or b in (0x22, 0x5C, 0x7F) for b in piece):
        return False
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def token_table(tokenizer: Tokenizer, n_vocab: int) -> TokenTable:
    """The table of the ids below n_vocab (the logits' length)."""
    pieces: list[bytes | None] = [None] * n_vocab
    for text, i in tokenizer.get_vocab(with_added_tokens=False).items():
        if i < n_vocab:
            pieces[i] = piece_bytes(text)
    for i in tokenizer.get_added_tokens_decoder():
        if i < n_vocab:
            pieces[i] = None
    first = torch.tensor([p[0] if p else 256 for p in pieces])
    index: dict[bytes, int] = {}
    pair = torch.tensor([index.setdefault(p[:2], len(index)) if p and len(p) > 1 else -1 for p in pieces])
    plain = torch.tensor([bool(p) and _plain(p) for p in pieces])
    return TokenTable(pieces, first, list(index), pair, plain,
                      min(n_vocab, tokenizer.get_vocab_size(with_added_tokens=True)))


class JsonConstraint:
    """Which tokens keep an answer a prefix of what `grammar` allows; `accept` the one chosen.
    The end-of-turn `stop_ids` are allowed once the value is complete, and only then."""

    def __init__(self, table: TokenTable, stop_ids: set[int], grammar: Grammar):
        self.table = table
        self.pieces = table.pieces
        self.stop_ids = stop_ids
        self.grammar = grammar
        self.state: State = grammar.initial
        self._next: dict[tuple[State, int], State | None] = {}
        self._steps: dict[tuple[State, int], State | None] = {}  # a byte's step, shared by tokens' common starts
        self._masks: dict[State, torch.Tensor] = {}  # admitted's, by state (a string's repeat)

    def _step(self, state: State, byte: int) -> State | None:
        key = (state, byte)
        got = self._steps.get(key, self)
        if got is self:
            if len(self._steps) > 1 << 20:
                self._steps.clear()
            got = self._steps[key] = self.grammar.step(state, byte)
        return got  # type: ignore[return-value]

    def _after(self, token: int) -> State | None:
        key = (self.state, token)
        if key not in self._next:
            if len(self._next) > 1 << 20:
                self._next.clear()
            piece = self.pieces[token] if 0 <= token < len(self.pieces) else None
            state: State | None = self.state if piece else None
            for byte in piece or b"":
                state = self._step(state, byte)
                if state is None:
                    break
            if (whole := self._whole(token)) is not None:  # taken whole by a token reference
                state = whole if state is None else state | whole
            self._next[key] = state
        return self._next[key]

    def _whole(self, token: int) -> State | None:
        """The parses after `token` taken whole by a GBNF token reference (None: none takes it)."""
        named = self.grammar.named_tokens
        if named is None or not 0 <= token < self.table.n_tokens:
            return None
        return self._taken(token if token in named else OTHER_TOKEN)

    def _taken(self, key: int) -> State | None:
        return self._step(self.state, TOKEN_BASE + key)

    def allows(self, token: int) -> bool:
        if token in self.stop_ids:  # the answer ends: where the grammar may, or where a reference names it
            named = self.grammar.named_tokens  # (not where a negated one takes any token, as in llama.cpp)
            return self.done or named is not None and token in named and self._whole(token) is not None
        return self._after(token) is not None

    def admitted(self, n_vocab: int) -> torch.Tensor:
        """A bool mask over the vocabulary of the tokens `allows`. Only tokens whose first two
        bytes the state takes are checked one by one (after `{ ` a 53k tokens begin with a space, a
        few with a space and a quote), and inside a string of any length plain text needs no check."""
        if self.state in self._masks:
            return self._masks[self.state]
        mask = torch.zeros(n_vocab, dtype=torch.bool)
        after = [self._step(self.state, b) for b in range(256)]
        starts = torch.tensor([s is not None for s in after] + [False])
        pairs = torch.tensor([(a := after[p[0]]) is not None and self._step(a, p[1]) is not None
                              for p in self.table.pairs] + [True])  # the last: tokens of one byte
        maybe = starts[self.table.first] & pairs[self.table.pair]
        if self.grammar.in_free_string(self.state):
            mask[:len(self.pieces)] = self.table.plain
            maybe &= ~self.table.plain
        for tok in torch.nonzero(maybe).flatten().tolist():
            mask[tok] = self._after(tok) is not None
        named = self.grammar.named_tokens
        if named is not None:  # token references: the tokens they name, and with a negated one all others
            if self._taken(OTHER_TOKEN) is not None:
                mask[:self.table.n_tokens] = True
            for tok in named:
                if tok < n_vocab:
                    mask[tok] = self._after(tok) is not None
        for tok in self.stop_ids:
            if tok < n_vocab:
                mask[tok] = self.allows(tok)
        if len(self._masks) >= 64:
            self._masks.clear()
        self._masks[self.state] = mask
        return mask

    def accept(self, token: int) -> None:
        if token in self.stop_ids:
            return
        after = self._after(token)
        if after is None:
            raise ValueError(f"token {token} does not continue the answer in its format")
        self.state = after

    @property
    def done(self) -> bool:
        return self.grammar.complete(self.state)


def format_grammar(format: Any, tokenizer: Tokenizer | None = None) -> Grammar:
    """"json" (any JSON object) or a JSON schema (a dict) as a Grammar, or a Grammar as it is
    (gbnf.parse_gbnf's; with `tokenizer`, its token references resolved by it); a SchemaError or
    a ValueError (gbnf.GrammarError) for anything else."""
    if isinstance(format, Grammar):
        if tokenizer is None:
            return format
        from .gbnf import resolve_tokens

        return resolve_tokens(format, tokenizer)
    if format == "json":
        return any_object()
    if isinstance(format, dict):
        return schema_grammar(format)
    raise ValueError(f"format {format!r}: 'json' (the answer one JSON object) or a JSON schema (a dict)")
