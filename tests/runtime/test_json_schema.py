"""format={JSON schema}: what json_schema.py's grammars take and refuse, byte by byte, the
schemas it refuses by name, and the tiny model's answers under one (generate, qvl-run)."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from qvl.runtime.json_schema import SchemaError, schema_grammar
from qvl.runtime.loader import load
from qvl.runtime.model import ModelError
from qvl.runtime.run_cli import app as run_app

MODEL = "tiny-qwen2.5-vl-f16.gguf"

# as pydantic writes one: $defs, titles, anyOf with null for an optional field, a default
PERSON = {
    "$defs": {"Pet": {"properties": {"name": {"title": "Name", "type": "string"},
                                     "kind": {"enum": ["cat", "dog"], "title": "Kind"}},
                      "required": ["name", "kind"], "title": "Pet", "type": "object"}},
    "properties": {"name": {"type": "string", "maxLength": 8},
                   "email": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
                   "age": {"type": "integer"},
                   "score": {"type": "number"},
                   "pets": {"type": "array", "items": {"$ref": "#/$defs/Pet"}, "maxItems": 2},
                   "ok": {"type": "boolean"}},
    "required": ["name", "age", "pets"], "title": "Person", "type": "object"}


def _takes(schema, text: str | bytes) -> bool:
    g = schema_grammar(schema)
    state = g.advance(g.initial, text if isinstance(text, bytes) else text.encode())
    return state is not None and g.complete(state)


def _refused_at(schema, text: str) -> int | None:
    """The index of the first byte refused, or None."""
    g = schema_grammar(schema)
    state = g.initial
    for i, byte in enumerate(text.encode()):
        state = g.step(state, byte)
        if state is None:
            return i
    return None


@pytest.mark.parametrize("doc", [
    {"name": "Ann", "age": 31, "pets": []},
    {"name": "Bob", "age": -2, "pets": [{"name": "Rex", "kind": "dog"}], "email": None, "ok": True},
    {"name": "Ünïcødé", "age": 0, "pets": [{"name": "A", "kind": "cat"}, {"name": "B", "kind": "dog"}],
     "email": "b@c.d", "score": -1.5e-3, "ok": False},
])
@pytest.mark.parametrize("layout", [dict(), dict(indent=2), dict(separators=(",", ":"))])
def test_documents_in_the_schemas_order_are_taken(doc, layout):
    """Required keys first, in the schema's order, then the optional ones in theirs (llama.cpp's
    order); every byte taken and the whole complete."""
    text = json.dumps(doc, ensure_ascii=False, **layout)
    assert _refused_at(PERSON, text) is None and _takes(PERSON, text), text


@pytest.mark.parametrize("text,at,why", [
    ('{"age": 1', 'age', "the required keys come first, in order"),
    ('{"name": "Ann", "age": 1}', '}', "pets is required"),
    ('{"name": "Annabelle", "age": 1, "pets": []}', 'e", "age', "maxLength 8"),
    ('{"name": "A", "age": 1.5', '.5', "an integer"),
    ('{"name": "A", "age": 1, "pets": [{"name": "R", "kind": "cow"}]}', 'ow', "the enum's values"),
    ('{"name": "A", "age": 1, "pets": [], "score": 1, "email": null}', 'email', "optional keys in order"),
    ('{"name": "A", "age": 1, "pets": [], "x": 1}', 'x"', "no keys the schema does not declare"),
    ('{"name": "A", "age": 1, "pets": [{"name": "a", "kind": "cat"}, {"name": "b", "kind": "cat"}, {}]}', ', {}',
     "maxItems 2"),
    ('{"name": "A", "age": 1, "pets": [], "ok": 1}', '1}', "a boolean"),
    ('{"name": "A", "age": 1, "pets": [], "email": 3}', '3}', "a string or null"),
])
def test_what_the_schema_refuses_and_where(text, at, why):
    assert _refused_at(PERSON, text) == len(text[:text.rindex(at)].encode()), why


@pytest.mark.parametrize("schema,takes,refuses", [
    ({"type": "array", "items": {"type": "integer"}, "minItems": 1}, ["[1]", "[1, -20]", "[\n  3\n]"], ["[]", "[1.0]"]),
    ({"type": "integer"}, ["0", "-12", "1234567890123456"], ["01", "1.5", "12345678901234567"]),
    ({"type": "string", "minLength": 2, "maxLength": 2}, ['"é😀"', '"\\u00e9x"', '"\\n\\t"'], ['"a"', '"abc"']),
    ({"type": "string"}, [b'"\xc3\xa9"', b'"\xf0\x9f\x98\x80"'],  # valid UTF-8 only: no cut, stray,
     [b'"\xc3"', b'"\xa9"', b'"\xc0\xaf"', b'"\xed\xa0\x80"', b'"\xf4\x90\x80\x80"', b'"\xe0\x80\xaf"']),
    # overlong, surrogate or beyond U+10FFFF
    ({"type": ["string", "null"]}, ['"x"', "null"], ["1", "nul"]),
    ({"const": {"a": [1, 2]}}, ['{"a": [1, 2]}'], ['{"a":[1,2]}', '{"a": [1, 3]}']),
    ({"enum": [1, "one", None, True]}, ["1", '"one"', "null", "true"], ["2", '"two"', "false"]),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": True},
     ['{"a": 1, "b": [true, {"c": null}]}', '{"z": "any"}', '{}', '{"ab": 1, "": 2}'],
     ['{"a": "x"}', '{"b": 1, "a": 2}']),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": {"type": "string"}},
     ['{"a": 1, "b": "x", "c": "y"}'], ['{"a": 1, "b": 2}']),
    ({"type": "object"}, ['{}', '{"any": {"thing": [1, "x"]}}'], ["[]", '{"a" : }']),
    ({"$ref": "#/definitions/Node", "definitions": {"Node": {"type": "object", "properties": {
        "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/definitions/Node"}}},
        "required": ["v"]}}},
     ['{"v": 1}', '{"v": 1, "kids": [{"v": 2, "kids": [{"v": 3}]}, {"v": 4}]}'], ['{"v": 1, "kids": [{}]}']),
    ({"anyOf": [{"type": "object", "properties": {"cat": {"type": "string"}}, "required": ["cat"]},
                {"type": "object", "properties": {"car": {"type": "integer"}}, "required": ["car"]}]},
     ['{"cat": "x"}', '{"car": 3}'], ['{"cat": 3}', '{"car": "x"}', '{"cow": 1}']),
    ({}, ['1', '"s"', '[{}]', 'null'], ['nil', "'s'"]),
    # prefixItems: pydantic's tuple[int, str] (min = max = 2), and a tuple with more items of a type
    ({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "minItems": 2, "maxItems": 2},
     ['[1, "a"]', '[ 7,"x" ]'], ['[1]', '["a", 1]', '[1, "a", 2]', '[]']),
    ({"type": "array", "prefixItems": [{"type": "string"}], "items": {"type": "integer"}},
     ['[]', '["a"]', '["a", 1, 2, 3]'], ['[1]', '["a", "b"]']),
    ({"type": "array", "prefixItems": [{"type": "null"}], "items": False}, ['[]', '[null]'], ['[null, null]']),
    # allOf: one schema (pydantic v1's field with a description), objects merged, enums intersected
    ({"properties": {"pet": {"allOf": [{"$ref": "#/$defs/Pet"}], "description": "the pet"}}, "required": ["pet"],
      "$defs": {"Pet": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}},
     ['{"pet": {"name": "Rex"}}'], ['{"pet": {}}', '{"pet": "Rex"}']),
    ({"allOf": [{"$ref": "#/$defs/A"}, {"properties": {"b": {"type": "integer"}}, "required": ["b"]}],
      "$defs": {"A": {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}}},
     ['{"a": "x", "b": 1}'], ['{"a": "x"}', '{"b": 1}', '{"b": 1, "a": "x"}']),
    ({"allOf": [{"enum": ["a", "b", "c"]}, {"enum": ["c", "b", "z"]}]}, ['"b"', '"c"'], ['"a"', '"z"']),
])
def test_schema_keywords(schema, takes, refuses):
    for text in takes:
        assert _takes(schema, text), text
    for text in refuses:
        assert not _takes(schema, text), text


@pytest.mark.parametrize("schema,message", [
    ({"type": "number", "minimum": 2, "maximum": 1}, "#: no number is between its bounds"),
    ({"properties": {"n": {"exclusiveMaximum": 3}}}, "#.properties.n: 'exclusiveMaximum' without a type is not"),
    ({"type": "integer", "minimum": 5, "maximum": 4.5}, "#: no integer is between its bounds (5 > 4)"),
    ({"type": "integer", "minimum": "0"}, "#.minimum: a number"),
    ({"type": "integer", "maximum": float("inf")}, "#.maximum: a number"),  # json.loads reads Infinity
    ({"type": "number", "multipleOf": 2.5e-17}, "#.multipleOf 2.5e-17: qvl writes at most 16 decimals"),
    ({"type": "array", "uniqueItems": True}, "#: 'uniqueItems' is not followed by qvl"),
    ({"allOf": [{"type": "string"}, {"minLength": 2}]}, "#.allOf[0]: allOf of object schemas (merged) or enums"),
    ({"allOf": [{"properties": {"a": {"type": "string"}}}, {"properties": {"a": {"type": "integer"}}}]},
     "#.allOf[1].properties.a: a second, different schema for it"),
    ({"allOf": [{"enum": [1]}, {"enum": [2]}]}, "#.allOf: no value is in every enum"),
    ({"allOf": [{"$ref": "#/$defs/A"}], "$defs": {"A": {"allOf": [{"$ref": "#/$defs/A"}]}}},
     "refers to itself through allOf"),
    ({"type": "array", "prefixItems": {"type": "integer"}}, "#.prefixItems: a list of schemas"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "#: minLength / maxLength together with a pattern"),
    ({"type": "string", "format": "date", "minLength": 1}, "#: minLength / maxLength together with format 'date'"),
    ({"type": "string", "pattern": "^a$", "format": "uuid"}, "#: a pattern together with format 'uuid'"),
    ({"type": "string", "pattern": "^(a)\\1$"}, "#: pattern '^(a)\\\\1$': \\1 is not followed"),
    ({"type": "string", "pattern": "^a(?=b)$"}, "look-arounds and other (?...) groups are not followed"),
    ({"$ref": "#/$defs/Nope"}, "#.$ref '#/$defs/Nope': no such definition"),
    ({"$ref": "https://example.com/s.json"}, "only #/$defs/NAME or #/definitions/NAME"),
    ({"properties": {"a": {}}, "required": ["b"]}, "#.required: 'b' is not among the properties"),
    ({"type": "date"}, "#.type 'date': one of object, array"),
    ({"enum": []}, "#.enum: a non-empty list"),
    ({"type": "array", "minItems": 3, "maxItems": 2}, "minItems / maxItems"),
    ([1], "a JSON schema is a JSON object"),
])
def test_schemas_qvl_cannot_follow_are_refused_by_name(schema, message):
    with pytest.raises(SchemaError) as e:
        schema_grammar(schema)
    assert message in str(e.value)


@pytest.fixture(scope="module")
def model_path(fixtures_dir):
    return fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / MODEL


@pytest.fixture(scope="module")
def model(model_path):
    return load(model_path)


@pytest.mark.parametrize("kwargs", [dict(), dict(temperature=1.0, top_k=40, seed=2)])
def test_the_models_answer_keeps_to_the_schema(model, kwargs):
    g = model.generate("Who are you?", max_new_tokens=40, format=PERSON, **kwargs)
    assert _refused_at(PERSON, g.text) is None and re.match(r'\{\s*"name"', g.text), g.text
    if g.ended:
        doc = json.loads(g.text)
        assert list(doc)[:3] == ["name", "age", "pets"] and isinstance(doc["age"], int)


def test_a_bad_schema_is_a_model_error(model):
    with pytest.raises(ModelError, match="#.properties.n: 'uniqueItems' is not followed"):
        model.generate("x", format={"properties": {"n": {"type": "array", "uniqueItems": True}}})
    with pytest.raises(ModelError, match="no token of the vocabulary continues the answer"):  # nothing satisfies it
        model.generate("x", format={"$ref": "#/$defs/A", "$defs": {"A": {"$ref": "#/$defs/A"}}})


def test_qvl_run_format_schema_file_and_inline(model, model_path, tmp_path):
    want = model.generate("Who are you?", max_new_tokens=12, format=PERSON).text
    schema_file = tmp_path / "person.json"
    schema_file.write_text(json.dumps(PERSON))
    for value in (str(schema_file), json.dumps(PERSON)):
        r = CliRunner().invoke(run_app, [str(model_path), "-p", "Who are you?", "-n", "12", "--format", value])
        assert r.exit_code == 0, r.output
        assert r.stdout.strip() == want.strip()
    (tmp_path / "bad.json").write_text('{"type": "array", "uniqueItems": true}')
    (tmp_path / "broken.json").write_text('{"type": ')
    for value, line in [(str(tmp_path / "bad.json"), f"{tmp_path / 'bad.json'}: #: 'uniqueItems' is not followed by qvl"),
                        (str(tmp_path / "broken.json"), f"{tmp_path / 'broken.json'}: not JSON"),
                        ('{"type": 1}', "--format: #.type 1: one of object")]:
        r = CliRunner().invoke(run_app, [str(model_path), "-p", "x", "--format", value])
        assert r.exit_code == 2 and r.output.strip().startswith(f"qvl-run: error: {line}"), r.output


def test_llama_cpps_json_schema_flags_and_field(model, model_path, tmp_path, running):
    """qvl-run's -j / --json-schema-file and the server's json_schema field (llama.cpp's names)
    answer as --format / response_format do; clashes and bad ones are one line / a 400."""
    want = model.generate("Who are you?", max_new_tokens=12, format=PERSON).text
    schema_file = tmp_path / "person.json"
    schema_file.write_text(json.dumps(PERSON))
    for args in (["-j", json.dumps(PERSON)], ["--json-schema-file", str(schema_file)]):
        r = CliRunner().invoke(run_app, [str(model_path), "-p", "Who are you?", "-n", "12", *args])
        assert r.exit_code == 0, r.output
        assert r.stdout.strip() == want.strip()
    for args, line in [(["-j", "{}", "--format", "json"], "--format and --json-schema: choose one"),
                       (["--json-schema-file", str(tmp_path / "nope.json")],
                        f"--json-schema-file {tmp_path / 'nope.json'}: a JSON schema; no such file"),
                       (["-j", '{"type": 1}'], "--json-schema: #.type 1: one of object"),
                       (["-j", "{}", "--grammar", 'root ::= "a"'], "--json-schema and --grammar: choose one")]:
        r = CliRunner().invoke(run_app, [str(model_path), "-p", "x", *args])
        assert r.exit_code == 2 and r.output.strip().startswith(f"qvl-run: error: {line}"), r.output
    messages = [{"role": "user", "content": "Who are you?"}]
    by_field = running.json("/v1/chat/completions", {"model": "tiny:1", "max_tokens": 12, "messages": messages,
                                                     "json_schema": PERSON})
    by_format = running.json("/v1/chat/completions", {"model": "tiny:1", "max_tokens": 12, "messages": messages,
                                                      "response_format": {"type": "json_schema",
                                                                          "json_schema": {"schema": PERSON}}})
    assert by_field["choices"][0]["message"]["content"] == by_format["choices"][0]["message"]["content"]
    for extra, expect in [({"json_schema": PERSON, "response_format": {"type": "json_object"}},
                           "json_schema: a JSON schema, without format"), ({"json_schema": [1]}, "json_schema: a JSON")]:
        status, data = running.request("/v1/completions", {"model": "tiny:1", "prompt": "x", **extra})
        assert status == 400 and expect in json.loads(data)["error"], data
