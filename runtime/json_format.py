"""`format="json"` (Ollama's `format`, OpenAI's `response_format: json_object`, llama.cpp's
json.gbnf): answers that are one JSON object, chosen token by token.

The grammar is llama.cpp's grammars/json.gbnf, read byte by byte (Qwen2's tokens are byte-level
BPE: one may end inside a UTF-8 character): the root is an object; whitespace is allowed after
`{ [ , :` and after every value and key, and is nothing, one space, or a newline followed by up to
20 spaces or tabs (so a model cannot pad forever); strings hold no control bytes and only JSON's
escapes; integers have at most 16 digits. Once the object is closed only that whitespace and an
end-of-turn token may follow. A state is a hashable tuple, so what a token does to a state is
computed once (`JsonConstraint.allows`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

# modes: what the next byte may be
START, VALUE, ARRAY0, OBJECT0, KEY, KEY_STR, VALUE_STR, COLON, AFTER, NUMBER, LITERAL = range(11)
_WS_MODES = frozenset((VALUE, ARRAY0, OBJECT0, KEY, COLON, AFTER))
_LITERALS = (b"true", b"false", b"null")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b'"\\/bfnrt')
_DIGITS = frozenset(b"0123456789")
# number parts (aux = part * 100 + digits so far): after "-", after a leading 0, integer digits,
# after ".", fraction digits, after e/E, after the exponent's sign, exponent digits
_MINUS, _ZERO, _INT, _DOT, _FRAC, _EXP, _EXP_SIGN, _EXP_DIGITS = range(8)
_NUMBER_ENDS = frozenset((_ZERO, _INT, _FRAC, _EXP_DIGITS))
MAX_INT_DIGITS = 16
MAX_WS_INDENT = 20

State = tuple[str, int, int]  # (stack of "O"/"A" for the open objects and arrays, mode, aux)
INITIAL: State = ("", START, 0)


def _ws(stack: str, mode: int, aux: int, byte: int) -> State | None:
    """Whitespace in a mode that takes it; aux 0: none yet, 1: one space, 2 + n: a newline and n indents."""
    if aux == 0:
        return (stack, mode, 1 if byte == 0x20 else 2) if byte in (0x20, 0x0A) else None
    if aux >= 2 and byte in (0x20, 0x09) and aux - 2 < MAX_WS_INDENT:
        return stack, mode, aux + 1
    return None


def _value_start(stack: str, byte: int) -> State | None:
    if byte == 0x7B:  # {
        return stack + "O", OBJECT0, 0
    if byte == 0x5B:  # [
        return stack + "A", ARRAY0, 0
    if byte == 0x22:  # "
        return stack, VALUE_STR, 0
    if byte == 0x2D:  # -
        return stack, NUMBER, _MINUS * 100
    if byte == 0x30:
        return stack, NUMBER, _ZERO * 100 + 1
    if 0x31 <= byte <= 0x39:
        return stack, NUMBER, _INT * 100 + 1
    for i, lit in enumerate(_LITERALS):
        if byte == lit[0]:
            return stack, LITERAL, i * 10 + 1
    return None


def _close(stack: str, byte: int) -> State | None:
    """`}` or `]` closing the innermost container, or None where it is the other kind."""
    if stack and byte == (0x7D if stack[-1] == "O" else 0x5D):
        return stack[:-1], AFTER, 0
    return None


def _number(stack: str, aux: int, byte: int) -> State | None:
    """The next byte of a number: still the number, or (the number over) the byte after it."""
    part, n = divmod(aux, 100)
    digit = byte in _DIGITS
    if part == _MINUS:
        if digit:
            return stack, NUMBER, (_ZERO if byte == 0x30 else _INT) * 100 + 1
        return None
    if part == _INT and digit:
        return (stack, NUMBER, aux + 1) if n < MAX_INT_DIGITS else None
    if part in (_ZERO, _INT) and byte == 0x2E:
        return stack, NUMBER, _DOT * 100
    if part in (_DOT, _FRAC) and digit:
        return stack, NUMBER, _FRAC * 100 + 1
    if part in (_ZERO, _INT, _FRAC) and byte in (0x65, 0x45):
        return stack, NUMBER, _EXP * 100
    if part == _EXP and byte in (0x2B, 0x2D):
        return stack, NUMBER, _EXP_SIGN * 100
    if part in (_EXP, _EXP_SIGN, _EXP_DIGITS) and digit:
        return (stack, NUMBER, _EXP_DIGITS * 100 + n + 1) if n < MAX_INT_DIGITS else None
    if part in _NUMBER_ENDS:
        return step((stack, AFTER, 0), byte)
    return None


def _string(stack: str, mode: int, aux: int, byte: int) -> State | None:
    if aux == 0:
        if byte == 0x22:
            return (stack, COLON, 0) if mode == KEY_STR else (stack, AFTER, 0)
        if byte == 0x5C:
            return stack, mode, 1
        return None if byte < 0x20 or byte == 0x7F else (stack, mode, 0)
    if aux == 1:  # after a backslash
        if byte == 0x75:  # u and four hex digits
            return stack, mode, 14
        return (stack, mode, 0) if byte in _ESCAPES else None
    if byte in _HEX:
        return stack, mode, 0 if aux == 11 else aux - 1
    return None


def step(state: State, byte: int) -> State | None:
    """The state after one more byte, or None where the grammar does not allow it."""
    stack, mode, aux = state
    if mode in (KEY_STR, VALUE_STR):
        return _string(stack, mode, aux, byte)
    if mode == NUMBER:
        return _number(stack, aux, byte)
    if mode == LITERAL:
        lit, pos = divmod(aux, 10)
        if byte != _LITERALS[lit][pos]:
            return None
        return (stack, AFTER, 0) if pos + 1 == len(_LITERALS[lit]) else (stack, LITERAL, aux + 1)
    if byte in (0x20, 0x0A, 0x09):
        return _ws(stack, mode, aux, byte) if mode in _WS_MODES else None
    if mode == START:
        return ("O", OBJECT0, 0) if byte == 0x7B else None
    if mode in (VALUE, ARRAY0):
        if mode == ARRAY0 and byte == 0x5D:
            return _close(stack, byte)
        return _value_start(stack, byte)
    if mode in (OBJECT0, KEY):
        if byte == 0x22:
            return stack, KEY_STR, 0
        return _close(stack, byte) if mode == OBJECT0 else None
    if mode == COLON:
        return (stack, VALUE, 0) if byte == 0x3A else None
    # AFTER: a value ended
    if not stack:
        return None  # the root object is closed: only whitespace
    if byte == 0x2C:  # ,
        return stack, KEY if stack[-1] == "O" else VALUE, 0
    return _close(stack, byte)


def advance(state: State | None, data: bytes) -> State | None:
    for byte in data:
        if state is None:
            return None
        state = step(state, byte)
    return state


def complete(state: State) -> bool:
    """The root object is closed (whitespace may still follow)."""
    return state[0] == "" and state[1] == AFTER


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet backwards: the character a token's text uses for each byte."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


@dataclass(frozen=True)
class TokenTable:
    """The vocabulary as bytes, made once per model (152k tokens: ~1 s)."""

    pieces: list[bytes | None]  # each id's bytes; None: an added token, never allowed as text
    first: torch.Tensor  # each id's first byte, 256 for none
    plain: torch.Tensor  # bool: bytes a string may hold as they are (no quote, backslash or control byte)


def token_table(tokenizer: Tokenizer, n_vocab: int) -> TokenTable:
    decoder = _byte_decoder()
    pieces: list[bytes | None] = [None] * n_vocab
    for text, i in tokenizer.get_vocab(with_added_tokens=False).items():
        if i < n_vocab and all(c in decoder for c in text):
            pieces[i] = bytes(decoder[c] for c in text)
    for i in tokenizer.get_added_tokens_decoder():
        if i < n_vocab:
            pieces[i] = None
    first = torch.tensor([p[0] if p else 256 for p in pieces])
    plain = torch.tensor([bool(p) and not any(b < 0x20 or b in (0x22, 0x5C, 0x7F) for b in p) for p in pieces])
    return TokenTable(pieces, first, plain)


class JsonConstraint:
    """Which tokens keep an answer a JSON object (or the prefix of one); `accept` the one chosen.
    The end-of-turn `stop_ids` are allowed once the object is complete, and only then."""

    def __init__(self, table: TokenTable, stop_ids: set[int]):
        self.table = table
        self.pieces = table.pieces
        self.stop_ids = stop_ids
        self.state: State = INITIAL
        self._next: dict[tuple[State, int], State | None] = {}

    def _after(self, token: int) -> State | None:
        key = (self.state, token)
        if key not in self._next:
            if len(self._next) > 1 << 20:
                self._next.clear()
            piece = self.pieces[token] if 0 <= token < len(self.pieces) else None
            self._next[key] = advance(self.state, piece) if piece else None
        return self._next[key]

    def allows(self, token: int) -> bool:
        if token in self.stop_ids:
            return complete(self.state)
        return self._after(token) is not None

    def admitted(self, n_vocab: int) -> torch.Tensor:
        """A bool mask over the vocabulary of the tokens `allows`. Only tokens whose first byte
        the state takes are checked, and inside a string plain text needs no check."""
        mask = torch.zeros(n_vocab, dtype=torch.bool)
        starts = torch.tensor([step(self.state, b) is not None for b in range(256)] + [False])
        maybe = starts[self.table.first]
        if self.state[1] in (KEY_STR, VALUE_STR) and self.state[2] == 0:
            mask[:len(self.pieces)] = self.table.plain
            maybe &= ~self.table.plain
        for tok in torch.nonzero(maybe).flatten().tolist():
            mask[tok] = self._after(tok) is not None
        if complete(self.state):
            mask[[t for t in self.stop_ids if t < n_vocab]] = True
        return mask

    def accept(self, token: int) -> None:
        if token in self.stop_ids:
            return
        after = self._after(token)
        if after is None:
            raise ValueError(f"token {token} does not continue the JSON answer")
        self.state = after

    @property
    def done(self) -> bool:
        return complete(self.state)
