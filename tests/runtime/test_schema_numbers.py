"""A schema's integer and number bounds, kept to byte by byte, against brute force: a full
number taken exactly when it is in the range, a prefix exactly when some number of the range
starts with it (integers), and never a prefix that no number of the range completes."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
from grammar_checks import state_after as _state
from grammar_checks import takes as _takes

from qvl.runtime.json_schema import schema_grammar


@pytest.mark.parametrize("bounds,lo,hi", [
    ({"minimum": 0, "maximum": 150}, 0, 150), ({"minimum": -40, "maximum": 5}, -40, 5),
    ({"exclusiveMinimum": -3.5, "exclusiveMaximum": 12}, -3, 11), ({"minimum": 1.2, "maximum": 7.9}, 2, 7),
    ({"minimum": 95}, 95, None), ({"maximum": -7}, None, -7), ({"minimum": 0, "maximum": 0}, 0, 0),
    ({"minimum": 10, "maximum": 19}, 10, 19),
])
def test_integer_bounds_against_brute_force(bounds, lo, hi):
    g = schema_grammar({"type": "integer", **bounds})
    values = range(-300, 301)
    inside = {x for x in values if (lo is None or x >= lo) and (hi is None or x <= hi)}
    for x in values:
        assert _takes(g, str(x)) is (x in inside), x
    texts = {str(x) for x in values} | {"-0", "00", "01", "-", "--1", "1-"}
    for s in sorted(texts):  # a prefix is taken when some integer of the range starts with it
        for cut in range(1, len(s) + 1):
            prefix = s[:cut]
            ok = any(str(x).startswith(prefix) for x in inside) or (
                hi is None and prefix.lstrip("-").isdigit() and not prefix.startswith("-") and prefix != "0"
                and not prefix.startswith("0")) or (
                lo is None and prefix.startswith("-") and prefix[1:2] not in ("0",) and prefix[1:].isdigit())
            if lo is None or hi is None:  # unbounded on a side: the brute-force window is not enough
                if ok:
                    assert _state(g, prefix) is not None, prefix
                continue
            assert (_state(g, prefix) is not None) is ok, prefix
    assert not _takes(g, "1" * 17)  # at most 16 digits, as every JSON integer here


def test_a_bounded_integer_inside_an_object():
    g = schema_grammar({"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 150}},
                        "required": ["age"]})
    assert _takes(g, '{"age": 42}') and _takes(g, '{"age": 150 }') and _takes(g, '{"age":0}')
    assert not _takes(g, '{"age": 151}') and not _takes(g, '{"age": -1}') and not _takes(g, '{"age": 4.5}')


def _completable(grammar, state, depth: int = 24) -> bool:
    """Some bytes of a number (digits, a point) complete the value from `state`."""
    if grammar.complete(state):
        return True
    if depth == 0:
        return False
    return any(_completable(grammar, nxt, depth - 1) for b in b"0123456789."
               if (nxt := grammar.step(state, b)) is not None)


NUMBER_RANGES = [
    ({"minimum": 0, "maximum": 1}, Fraction(0), False, Fraction(1), False),
    ({"exclusiveMinimum": 0, "exclusiveMaximum": 1}, Fraction(0), True, Fraction(1), True),
    ({"minimum": -2.5, "maximum": 10.25}, Fraction(-5, 2), False, Fraction(41, 4), False),
    ({"minimum": 0.1, "exclusiveMaximum": 0.1001}, Fraction(1, 10), False, Fraction(1001, 10000), True),
    ({"exclusiveMinimum": -1}, Fraction(-1), True, None, False),
    ({"maximum": -0.5}, None, False, Fraction(-1, 2), False),
    ({"minimum": 3, "exclusiveMinimum": 3, "maximum": 5}, Fraction(3), True, Fraction(5), False),  # the tighter
]


def _inside(x: Fraction, lo, lo_open, hi, hi_open) -> bool:
    return ((lo is None or x > lo or x == lo and not lo_open) and (hi is None or x < hi or x == hi and not hi_open))


@pytest.mark.parametrize("bounds,lo,lo_open,hi,hi_open", NUMBER_RANGES)
def test_number_bounds_against_brute_force(bounds, lo, lo_open, hi, hi_open):
    g = schema_grammar({"type": "number", **bounds})
    rng = random.Random(str(bounds))
    texts = {f"{i}" for i in range(-12, 13)} | {f"{i}.{f:0{n}d}" for i in range(-3, 12) for n in (1, 2, 4)
                                                   for f in rng.sample(range(10 ** n), min(10 ** n, 12))}
    texts |= {"0.1", "0.1001", "0.10009", "0.1000999", "-1.0", "-0.99", "-0.5", "-0.50", "-0.49", "3.0", "3.0001"}
    for text in sorted(texts):
        x = Fraction(text)
        assert _takes(g, text) is _inside(x, lo, lo_open, hi, hi_open), text
        for cut in range(1, len(text) + 1):  # no prefix taken that nothing completes
            state = _state(g, text[:cut])
            if state is not None:
                assert _completable(g, state), text[:cut]
    for text in ("1e3", ".5", "01", "+1", "1.", "--1"):
        assert not _takes(g, text), text


def test_a_number_range_with_no_number_is_refused():
    from qvl.runtime.json_schema import SchemaError

    for bounds in ({"minimum": 2, "maximum": 1}, {"exclusiveMinimum": 1, "maximum": 1}, {"maximum": float("inf")}):
        with pytest.raises(SchemaError):
            schema_grammar({"type": "number", **bounds})


@pytest.mark.parametrize("schema,lo,hi,multiple", [
    ({"type": "integer", "multipleOf": 5}, None, None, 5),
    ({"type": "integer", "multipleOf": 7, "minimum": -40, "maximum": 100}, -40, 100, 7),
    ({"type": "integer", "multipleOf": 25, "exclusiveMinimum": 0, "maximum": 260}, 1, 260, 25),
    ({"type": "integer", "multipleOf": 1.5, "minimum": 0, "maximum": 50}, 0, 50, 3),  # 1.5k is an integer: 3 | it
    ({"type": "integer", "multipleOf": 10, "minimum": 95, "maximum": 105}, 95, 105, 10),
    ({"type": "number", "multipleOf": 4, "maximum": 30.5}, None, 30, 4),  # a number's integer multiples
])
def test_integer_multiples_against_brute_force(schema, lo, hi, multiple):
    """multipleOf: a whole integer taken exactly when it is a multiple in the range; a prefix
    exactly when some such integer (of up to 3 digits, or any, where unbounded) starts with it."""
    g = schema_grammar(schema)
    window = range(-999, 1000)
    inside = [x for x in window if (lo is None or x >= lo) and (hi is None or x <= hi) and x % multiple == 0]
    for x in window:
        assert _takes(g, str(x)) is (x in inside), x
    for x in window:
        s = str(x)
        for cut in range(1, len(s) + 1):
            prefix = s[:cut]
            ok = any(str(y).startswith(prefix) for y in inside)
            if not ok and (lo is None or hi is None):  # longer integers: some multiple starts with any prefix
                continue
            assert (_state(g, prefix) is not None) is ok, prefix


@pytest.mark.parametrize("schema,places,lo,hi", [
    ({"type": "number", "multipleOf": 0.01}, 2, None, None),
    ({"type": "number", "multipleOf": 0.05, "minimum": -1}, 2, Fraction(-1), None),
    ({"type": "number", "multipleOf": 0.25, "exclusiveMinimum": -0.5, "maximum": 1.9}, 2, Fraction(-1, 2),
     Fraction(19, 10)),
    ({"type": "number", "multipleOf": 2.5, "maximum": 5}, 1, None, Fraction(5)),
    ({"type": "number", "multipleOf": 0.003, "minimum": 0, "maximum": 0.02}, 3, Fraction(0), Fraction(1, 50)),
    ({"type": "number", "multipleOf": 0.1, "minimum": -1.25, "maximum": 2}, 1, Fraction(-5, 4), Fraction(2)),
    ({"type": "number", "multipleOf": 0.01, "exclusiveMinimum": 0, "exclusiveMaximum": 0.05}, 2, Fraction(0),
     Fraction(1, 20)),
    ({"type": "number", "multipleOf": 0.001, "minimum": 0.0004, "maximum": 0.0021}, 3, Fraction(4, 10000),
     Fraction(21, 10000)),
])
def test_decimal_multiples_against_brute_force(schema, places, lo, hi):
    """multipleOf of a decimal (0.1, 0.05, 2.5, ...): a number taken exactly when it is written with
    at most the multiple's decimals, is a multiple and is in the range; no prefix taken that nothing
    completes."""
    g = schema_grammar(schema)
    multiple = Fraction(repr(schema["multipleOf"]))
    lo_open, hi_open = "exclusiveMinimum" in schema, "exclusiveMaximum" in schema
    texts = {f"{i}" for i in range(-3, 4)} | {f"{i}.{f:0{n}d}" for i in range(-2, 3) for n in (1, 2, 3, 4)
                                               for f in range(0, 10 ** n, max(1, 10 ** n // 40))}
    texts |= {"0.0004", "0.0005", "0.002", "0.0021", "0.0022", "-1.2", "-1.3", "0.04", "0.05", "0.01", "0.010",
              "-0.25", "-0.5", "1.75", "2.5", "5", "5.0", "7.5", "-2.5", "0.006", "0.018", "0.021", "0.0180", "-1.00"}
    for text in sorted(texts):
        x = Fraction(text)
        decimals = len(text.split(".")[1]) if "." in text else 0
        want = decimals <= places and (x / multiple).denominator == 1 and _inside(x, lo, lo_open, hi, hi_open)
        assert _takes(g, text) is want, text
        for cut in range(1, len(text) + 1):
            state = _state(g, text[:cut])
            if state is not None:
                assert _completable(g, state), text[:cut]


@pytest.mark.parametrize("schema,expect", [
    ({"type": "integer", "multipleOf": 5, "minimum": 1, "maximum": 4}, "no multiple of 5 is between its bounds"),
    ({"type": "number", "multipleOf": 0.01, "minimum": 0.001, "maximum": 0.009}, "no multiple of 0.01 is between"),
    ({"type": "number", "multipleOf": 0.25, "minimum": 0.3, "maximum": 0.45}, "no multiple of 0.25 is between"),
    ({"type": "number", "multipleOf": 1e-20}, "multipleOf 1e-20: qvl writes at most 16 decimals"),
    ({"type": "integer", "multipleOf": 0}, "multipleOf: a number above 0"),
    ({"type": "integer", "multipleOf": "5"}, "multipleOf: a number above 0"),
    ({"multipleOf": 3}, "multipleOf is followed by qvl with type integer or number"),
    ({"type": "integer", "multipleOf": 3, "enum": [3, 6]}, "and no const, enum"),
])
def test_multiples_refused(schema, expect):
    from qvl.runtime.json_schema import SchemaError

    with pytest.raises(SchemaError, match=expect.replace("(", r"\(").replace(".", r"\.")):
        schema_grammar(schema)
