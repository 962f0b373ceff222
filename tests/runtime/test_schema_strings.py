"""A schema's string formats and patterns, kept to byte by byte: patterns against Python's own
`re` on the string the JSON holds, formats against llama.cpp's rules' examples."""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest
from grammar_checks import state_after as _state
from grammar_checks import takes as _takes

from qvl.runtime.json_schema import schema_grammar


@pytest.mark.parametrize("fmt,takes,refuses", [
    ("date", ["2024-02-29", "1999-12-31", "2024-02-31"],  # llama.cpp's rule: days 01-31 in every month
     ["2024-2-29", "2024-13-01", "2024-00-10", "2024-01-32", "24-01-01", "2024-01-01T00:00:00Z"]),
    ("time", ["23:59:59Z", "00:00:00.123+05:30", "12:30:00-08:00"],
     ["24:00:00Z", "12:60:00Z", "12:30:00", "12:30:00.1Z", "12:30Z"]),
    ("date-time", ["2024-02-29T12:30:00Z", "2024-02-29T12:30:00.500+01:00"],
     ["2024-02-29 12:30:00Z", "2024-02-29T12:30:00", "2024-02-29"]),
    ("uuid", ["123e4567-e89b-12d3-a456-426614174000", "ABCDEF01-2345-6789-ABCD-EF0123456789"],
     ["123e4567e89b12d3a456426614174000", "123e4567-e89b-12d3-a456-42661417400", "g23e4567-e89b-12d3-a456-426614174000"]),
    ("uuid4", ["123e4567-e89b-42d3-a456-426614174000"], ["x"]),
])
def test_string_formats(fmt, takes, refuses):
    g = schema_grammar({"type": "string", "format": fmt})
    for text in takes:
        assert _takes(g, json.dumps(text)), text
    for text in refuses:
        assert not _takes(g, json.dumps(text)), text


@pytest.mark.parametrize("fmt", ["email", "uri", "int32", "custom"])
def test_other_formats_are_annotations(fmt):
    g = schema_grammar({"type": "string", "format": fmt})
    assert _takes(g, '"anything at all"') and not _takes(g, "1")
    assert _takes(schema_grammar({"type": "integer", "format": "int32"}), "12")  # a non-string's format too


ALPHABET = ['a', 'b', 'Z', '0', '7', '-', '_', ' ', '.', '"', '\\', '\n', 'é', '☺', '{', '(']
PATTERNS = [
    r"^[A-Z]{2}-\d{3}$", r"^\d+(\.\d{1,2})?$", r"^(cat|dog)s?$", r"^[^a-z]*$", r"^\w+@\w+\.\w{2,}$",
    r"^a.b$", r"^(?:ab|c)+$", r"^(?<word>[a-z]+) \d$", r"^[\d\-_]{2,3}$", r"^\s*\S+$", r"^[^\W\d]+$",
    r"cat", r"^ab", r"b$", r'^"[a-z]*"$', r"^\\\.$", r"^\u00e9+$", r"^\x41\{1}$", r"^a{2}b*?$", r"^$",
]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_patterns_against_pythons_re(pattern):
    """Every string of up to 4 characters of a small alphabet (and random longer ones): taken
    exactly when Python's re.search finds the pattern in it (JSON Schema's reading: anchors
    where the pattern has them), written as json.dumps writes it."""
    g = schema_grammar({"type": "string", "pattern": pattern})
    # Python's $ also matches before a last newline, ECMA-262's only at the end; \d \w \s: ASCII here
    python = re.sub(r"\(\?<(?=\w)", "(?P<", pattern)  # ECMA-262's named group, as Python 3.11 writes one
    rx = re.compile(python[:-1] + r"\Z" if python.endswith("$") else python, re.ASCII)
    rng = random.Random(pattern)
    texts = ["".join(t) for n in range(4) for t in itertools.product(ALPHABET, repeat=n)]
    texts += ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(4, 9))) for _ in range(300)]
    texts += ["AB-123", "12.5", "cats", "dog", "x@y.com", "word 7", "a-_", "  x", "abc", "ééé", "A{", '"ab"']
    for text in texts:
        assert _takes(g, json.dumps(text, ensure_ascii=False)) is (rx.search(text) is not None), (pattern, text)


def test_a_pattern_takes_only_whole_characters_json_writes():
    g = schema_grammar({"type": "string", "pattern": "^.+$"})
    assert _takes(g, '"a\\"b"') and _takes(g, '"\\\\"') and _takes(g, '"\\t"')  # ", \ and a tab, escaped
    assert not _takes(g, '"a"b"') and not _takes(g, '"\t"') and not _takes(g, '"\\n"')  # . is no line end
    assert not _takes(g, '"\\u0061"')  # one spelling a character: "a" is written as it is


def test_the_models_answer_keeps_to_bounds_formats_and_patterns(fixtures_dir):
    from qvl.runtime.loader import load

    model = load(fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf")
    schema = {"type": "object", "properties": {
        "when": {"type": "string", "format": "date"}, "age": {"type": "integer", "minimum": 18, "maximum": 65},
        "code": {"type": "string", "pattern": "^[A-Z]{2}-\\d{3}$"}, "id": {"type": "string", "format": "uuid"},
        "score": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["when", "age", "code", "id", "score"]}
    g = schema_grammar(schema)
    for seed in range(2):
        out = model.generate("Fill it in.", format=schema, max_new_tokens=120, temperature=1.0, seed=seed)
        assert _state(g, out.text) is not None, out.text
        if out.ended:
            doc = json.loads(out.text)
            assert re.fullmatch(r"\d{4}-\d\d-\d\d", doc["when"]) and 18 <= doc["age"] <= 65
            assert re.fullmatch(r"[A-Z]{2}-\d{3}", doc["code"]) and len(doc["id"]) == 36 and 0 <= doc["score"] <= 1


def test_pydantic_models_schemas_are_followed():
    """pydantic's schemas of datetime, date, UUID, bounded int, multiple_of, tuple, enum, nested and optional
    fields (typer needs pydantic: it is always here): followed, and an instance's JSON taken."""
    import datetime
    import enum
    import uuid
    from typing import Annotated, Optional

    from pydantic import BaseModel, Field

    class Colour(enum.Enum):
        RED = "red"
        BLUE = "blue"

    class Pet(BaseModel):
        name: Annotated[str, Field(pattern=r"^[A-Z][a-z]+$")]
        age: Annotated[int, Field(ge=0, le=30)]
        weight: Annotated[int, Field(multiple_of=5)]
        price: Annotated[float, Field(multiple_of=0.01, ge=0)]

    class Person(BaseModel):
        id: uuid.UUID
        born: datetime.date
        seen: datetime.datetime
        size: tuple[int, str]
        colour: Colour
        pet: Pet
        note: Optional[str]
        tags: list[Annotated[str, Field(max_length=5)]]

    g = schema_grammar(Person.model_json_schema())
    person = Person(id=uuid.UUID("123e4567-e89b-12d3-a456-426614174000"), born=datetime.date(1990, 5, 17),
                    seen=datetime.datetime(2026, 12, 6, 16, 30, tzinfo=datetime.timezone.utc), size=(180, "cm"),
                    colour=Colour.BLUE, pet=Pet(name="Rex", age=3, weight=25, price=9.99), note=None, tags=["a", "bb"])
    assert _takes(g, person.model_dump_json()), person.model_dump_json()
    bad = json.loads(person.model_dump_json())
    pet = {"name": "Rex", "age": 3, "weight": 25, "price": 9.99}
    for key, value in [("born", "1990-5-17"), ("size", [180]), ("colour", "green"), ("pet", {**pet, "name": "rex"}),
                       ("pet", {**pet, "age": 31}), ("pet", {**pet, "weight": 24}), ("pet", {**pet, "price": 9.999}),
                       ("pet", {**pet, "price": -1.0}), ("tags", ["toolong"]), ("id", "123")]:
        assert not _takes(g, json.dumps({**bad, key: value})), key
