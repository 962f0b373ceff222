"""GBNF grammars (gbnf.py, llama.cpp's `--grammar`): what a grammar accepts and refuses, byte by
byte; the grammars it cannot follow refused by line or rule; and answers kept to one, in Python,
in qvl-run and through qvl serve."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from qvl.runtime.gbnf import JSON_GBNF as JSON
from qvl.runtime.gbnf import GrammarError, parse_gbnf
from qvl.runtime.json_format import JsonConstraint, token_table
from qvl.runtime.loader import load
from qvl.runtime.run_cli import app as run_app

ARITHMETIC = '''root ::= expr
expr ::= term (("+" | "-") term)*
term ::= num | "(" expr ")"
num  ::= [0-9]+
'''
MISC = r'''root ::= greeting " " name{1,3} tail
greeting ::= "hi"
    | "hello"     # an alternative on a line of its own
    | "\x48ey"    # Hey
name ::= [A-Z] [a-zé]* "."
tail ::= ("!" | ) [^\n]? "\u263A"
'''


def accepts(grammar, text: str) -> bool:
    state = grammar.advance(grammar.initial, text.encode())
    return state is not None and grammar.complete(state)


@pytest.mark.parametrize("grammar,text,ok", [
    (JSON, "{}", True), (JSON, '{"a": [1, 2.5e3, {"b": null}], "c": "é\\n\\u00e9"}', True),
    (JSON, '{"a":1} ', True), (JSON, "{", False), (JSON, "[1]", False), (JSON, '{"a": 01}', False),
    (JSON, "{} x", False), (JSON, '{"a": "\x01"}', False), (JSON, '{"a": "\\q"}', False),
    (ARITHMETIC, "1+2", True), (ARITHMETIC, "(1+2)-30", True), (ARITHMETIC, "((7))", True),
    (ARITHMETIC, "1+", False), (ARITHMETIC, "+1", False), (ARITHMETIC, "(1", False), (ARITHMETIC, "1 + 2", False),
    (MISC, "hi Bob.☺", True), (MISC, "hello Ann.Zoé.!x☺", True), (MISC, "Hey A.B.C.☺", True),
    (MISC, "hey Bob.☺", False),  # \x48 is H
    (MISC, "hi A.B.C.D.☺", False),  # {1,3}
    (MISC, "hi bob.☺", False), (MISC, "hi Bob.\n☺", False), (MISC, "hi Bob.!ab☺", False), (MISC, "hi Bob.", False),
])
def test_what_a_grammar_accepts(grammar, text, ok):
    assert accepts(parse_gbnf(grammar), text) is ok


def test_a_root_that_may_be_empty():
    g = parse_gbnf('root ::= "a"*\n')
    assert g.complete(g.initial) and accepts(g, "aaa") and not accepts(g, "ab")
    assert not parse_gbnf('root ::= "a"+\n').complete(parse_gbnf('root ::= "a"+\n').initial)


def test_a_character_is_read_as_utf8():
    g = parse_gbnf('root ::= [^a-z] [α-ω]\n')  # a class over Unicode characters, not bytes
    assert accepts(g, "Éβ") and accepts(g, "1ω") and not accepts(g, "aβ") and not accepts(g, "1a")
    assert g.advance(g.initial, "É".encode()[:1]) is not None  # half a character: it may go on
    assert g.advance(g.initial, b"\xc3\x28") is None  # not UTF-8
    assert g.advance(g.initial, b"\xed\xa0\x80") is None  # a surrogate's bytes: not UTF-8 either
    # a character's first byte only where a character of the class starts with it
    digit, wide = parse_gbnf("root ::= [0-9]\n"), parse_gbnf("root ::= [^\\x00-\\x7F\\u00C0-\\u00FF]\n")
    assert digit.advance(digit.initial, b"\xc3") is None and accepts(digit, "7")
    assert digit.advance(digit.initial, b"\xe0") is None  # U+0800.. only: no digit (its low bits said 0..)
    assert wide.advance(wide.initial, b"\xc3") is None and accepts(wide, "ā") and not accepts(wide, "é")


@pytest.mark.parametrize("text,expect", [
    ('root ::= a\n', "grammar line 1: undefined rule 'a'"),
    ('x ::= "a"\n', "no root rule"),
    ('root ::= root "a" | "b"\n', "left recursion through rule 'root'"),
    ('root ::= x\nx ::= y? root\ny ::= "a"\n', "left recursion"),
    ('root ::= ("a"?)*\n', "a repetition (*) of something that can be empty"),
    ('root ::= "a" )\n', "grammar line 1: unexpected ')"),
    ('root := "a"\n', "expected '::=' after rule name 'root'"),
    ('root ::= "a"\nroot ::= "b"\n', "grammar line 2: rule 'root' defined twice"),
    ('root ::= "abc\n', "grammar line 1: a literal ends on its own line"),
    ('root ::= [z-a]\n', "character range 'z'-'a' runs backwards"),
    ('root ::= "a"{3,1}\n', "the most below the least"),
    ('root ::= "\\q"\n', "unknown escape \\q"),
    ('root ::= !"a"\n', "grammar line 1: expected '<' after '!'"),  # token references (test_gbnf_tokens.py)
    ('root ::= <[12>\n', "expected ']>' after a token id"),
    ('root ::= <[]>\n', "expected a number"),
    ('root ::= "a"\nx ::= <abc\n', "grammar line 2: a token <...> ends on its line with '>'"),
])
def test_grammars_refused(text, expect):
    with pytest.raises(GrammarError, match=None) as e:
        parse_gbnf(text)
    assert expect in str(e.value)


@pytest.fixture(scope="module")
def model(fixtures_dir):
    return load(fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf")


def test_an_answer_keeps_to_the_grammar(model):
    """Greedy under a grammar: each token the likeliest the grammar allows (checked at the first
    step against every token of the vocabulary), the answer one the grammar accepts, ended there."""
    grammar = parse_gbnf('root ::= ("yes" | "no" | "maybe") ("." | "!")\n')
    g = model.generate("Is it red?", max_new_tokens=12, format=grammar)
    assert g.text in [a + b for a in ("yes", "no", "maybe") for b in ".!"] and g.ended
    form = JsonConstraint(token_table(model.tokenizer, model.cfg.n_vocab), model.stop_ids, grammar)
    allowed = torch.tensor([form.allows(t) for t in range(model.cfg.n_vocab)])
    logits = model.prompt_logits("Is it red?")[-1].float()
    assert int(torch.where(allowed, logits, -torch.inf).argmax()) == g.token_ids[0]


@pytest.mark.parametrize("grammar", [JSON, ARITHMETIC, MISC])
def test_sampled_answers_keep_to_the_grammar(model, grammar):
    """Drawn at temperature 1 (the random model's tokens mostly refused): every answer is a
    prefix the grammar takes, a whole one where it ended on its end-of-turn token."""
    g = parse_gbnf(grammar)
    for seed in range(3):
        out = model.generate("Write.", format=g, max_new_tokens=24, temperature=1.0, seed=seed)
        state = g.advance(g.initial, out.text.encode())
        assert state is not None, out.text
        assert not out.ended or g.complete(state), out.text


def test_qvl_run_grammar_flags(model, fixtures_dir, tmp_path):
    runner = CliRunner()
    path = str(fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf")
    (tmp_path / "digits.gbnf").write_text('root ::= [0-9]{3} "."\n')
    r = runner.invoke(run_app, [path, "-p", "Count.", "-n", "8", "--grammar-file", str(tmp_path / "digits.gbnf"),
                                "--json"])
    assert r.exit_code == 0, r.output
    text = json.loads(r.stdout)["text"]
    assert len(text) == 4 and text[:3].isdigit() and text[3] == "."
    r = runner.invoke(run_app, [path, "-p", "Count.", "-n", "8", "--grammar", 'root ::= "ok"', "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["text"] == "ok"
    (tmp_path / "bad.gbnf").write_text('root ::= x\n')
    for args, expect in [(["--grammar-file", str(tmp_path / "bad.gbnf")], "bad.gbnf: grammar line 1: undefined rule"),
                         (["--grammar-file", str(tmp_path / "none.gbnf")], "none.gbnf: file not found"),
                         (["--grammar", 'root ::= "a"', "--format", "json"], "--format and --grammar: choose one"),
                         (["--grammar", 'root ::= "a"', "--grammar-file", str(tmp_path / "digits.gbnf")],
                          "--grammar and --grammar-file: choose one")]:
        r = runner.invoke(run_app, [path, "-p", "x", *args])
        assert r.exit_code == 2 and expect in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_serve_takes_llama_cpp_servers_grammar(running):
    body = {"model": "tiny:1", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}],
            "grammar": 'root ::= "a" [bc]{2}'}
    got = running.json("/v1/chat/completions", body)
    text = got["choices"][0]["message"]["content"]
    assert len(text) == 3 and text[0] == "a" and set(text[1:]) <= {"b", "c"}
    ollama = running.json("/api/generate", {"model": "tiny:1", "prompt": "Hi", "stream": False,
                                            "grammar": 'root ::= "x" | "y"'})
    assert ollama["response"] in ("x", "y") and ollama["done_reason"] == "stop"
    for extra, expect in [({"grammar": "root ::= nope"}, "undefined rule 'nope'"),
                          ({"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}},
                           "grammar: GBNF text, without format")]:
        status, data = running.request("/v1/chat/completions", {**body, **extra})
        assert status == 400 and expect in json.loads(data)["error"], data


def test_json_gbnf_reads_as_format_json_does():
    """llama.cpp's json.gbnf through gbnf.py against format="json"'s own JSON grammar (written
    apart, json_grammar.py): the same verdict, prefix by prefix, on documents and on mutants of
    them (a byte dropped, doubled or replaced). Exponents are left out: json.gbnf's are odd."""
    import random

    from qvl.runtime.json_grammar import any_object

    ours, theirs = any_object(), parse_gbnf(JSON)
    rng = random.Random(7)

    def value(depth: int):
        kind = rng.choice(["s", "n", "b", "o", "a"] if depth < 3 else ["s", "n", "b"])
        if kind == "s":
            return "".join(rng.choice('ab é"\\\n\t☺') for _ in range(rng.randint(0, 4)))
        if kind == "n":
            return rng.choice([0, -3, 12, 4.5, -0.25, 10**15])
        if kind == "b":
            return rng.choice([True, False, None])
        if kind == "o":
            return {f"k{i}": value(depth + 1) for i in range(rng.randint(0, 3))}
        return [value(depth + 1) for _ in range(rng.randint(0, 3))]

    docs = []
    for _ in range(40):
        text = json.dumps({f"k{i}": value(1) for i in range(rng.randint(0, 3))}, ensure_ascii=rng.random() < 0.5,
                          indent=rng.choice([None, 2]), separators=rng.choice([None, (",", ":")]))
        docs.append(text.encode())
    for doc in list(docs):
        i = rng.randrange(len(doc))
        docs += [doc[:i] + doc[i + 1:], doc[:i] + doc[i:i + 1] * 2 + doc[i + 1:],
                 doc[:i] + bytes([rng.choice(b'{}[]",:0 \n-.ex\\')]) + doc[i + 1:], doc + b" ", doc + b"\n\n"]
    checked = 0
    for doc in docs:
        a, b = ours.initial, theirs.initial
        for byte in doc:
            a, b = ours.step(a, byte) if a else None, theirs.step(b, byte) if b else None
            assert (a is None) == (b is None), doc
            if a is None:
                break
            assert ours.complete(a) == theirs.complete(b), doc
            checked += 1
    assert checked > 3000
