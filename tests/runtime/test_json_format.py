"""format="json": the grammar of any object (llama.cpp's json.gbnf, byte by byte), the
vocabulary's bytes, the sampler's choice among the allowed tokens, and the tiny model's answers
through generate and the CLI (schemas: test_json_schema.py)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from typer.testing import CliRunner

import qvl.runtime.model as model_module
from qvl.runtime.json_format import JsonConstraint, token_table
from qvl.runtime.json_grammar import MAX_INT_DIGITS, MAX_WS_INDENT, any_object
from qvl.runtime.loader import load
from qvl.runtime.run_cli import app as run_app
from qvl.runtime.sampling import FormatError, SamplingParams, _penalized, candidates, sample, sample_allowed

MODEL = "tiny-qwen2.5-vl-f16.gguf"
OBJECT = any_object()  # format="json"
INITIAL = OBJECT.initial
advance, complete, step = OBJECT.advance, OBJECT.complete, OBJECT.step


def _value(rng: random.Random, depth: int):
    kinds = ["str", "int", "float", "lit"] + (["obj", "arr"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "str":
        return "".join(rng.choice(['a', ' ', '"', '\\', '\n', '\t', 'é', '😀', '\x01', '/', '中'])
                       for _ in range(rng.randrange(6)))
    if kind == "int":
        return rng.randrange(-10**15, 10**15)
    if kind == "float":
        return rng.choice([0.0, -0.0, 1.5, 2.5e-300, -3.25e200, 1e16, 123.456])
    if kind == "lit":
        return rng.choice([True, False, None])
    if kind == "arr":
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return _object(rng, depth + 1)


def _object(rng: random.Random, depth: int = 0) -> dict:
    return {f"k{i}{rng.choice(['', 'é', ' x'])}": _value(rng, depth) for i in range(rng.randrange(4))}


def _prefixes_ok(data: bytes) -> tuple[bool, object]:
    state = INITIAL
    for byte in data:
        state = step(state, byte)
        if state is None:
            return False, None
    return True, state


@pytest.mark.parametrize("seed", range(40))
def test_what_json_dumps_writes_is_taken_byte_by_byte(seed):
    """Random nested objects as json.dumps writes them (compact, spaced, indented, UTF-8 or \\u
    escapes): every prefix is taken, and the whole is complete; nothing before the last byte is."""
    rng = random.Random(seed)
    obj = _object(rng)
    layout = [dict(), dict(separators=(",", ":")), dict(indent=2), dict(indent="\t")][seed % 4]
    text = json.dumps(obj, ensure_ascii=seed % 2 == 0, **layout)
    data = text.encode()
    state = INITIAL
    for i, byte in enumerate(data):
        assert not complete(state), text[:i]
        state = step(state, byte)
        assert state is not None, (text, i)
    assert complete(state)
    assert json.loads(data) == obj


@pytest.mark.parametrize("text,bad_at,why", [
    ('[1]', 0, "the root is an object"),
    (' {}', 0, "no whitespace before the root"),
    ("{'a': 1}", 1, "keys are double-quoted"),
    ('{"a" 1}', 5, "a colon after a key"),
    ('{"a": 01}', 7, "no leading zeros"),
    ('{"a": tru}', 9, "literals are whole"),
    ('{"a": 1,}', 8, "no trailing comma"),
    ('{"a": "\x01"}', 7, "no control bytes in strings"),
    ('{"a": "\\x"}', 8, "only JSON's escapes"),
    ('{"a": "\\u12g4"}', 11, "four hex digits after \\u"),
    ('{"a": -}', 7, "a digit after the minus"),
    ('{"a": 1.}', 8, "a digit after the point"),
    ('{"a": 1e}', 8, "a digit in the exponent"),
    ('{"a": [1 2]}', 9, "commas between items"),
    ('{"a": [1}', 8, "brackets match"),
    ('{}x', 2, "nothing after the root but whitespace"),
    ('{}  ', 3, "whitespace: one space, or a newline and indents"),
    ('{"a":  1}', 6, "one space"),
    ('{"a": 1' + '1' * MAX_INT_DIGITS + '}', 6 + MAX_INT_DIGITS, "integers have at most 16 digits"),
    ('{\n' + ' ' * (MAX_WS_INDENT + 1) + '}', 2 + MAX_WS_INDENT, "at most 20 indents"),
])
def test_what_json_refuses_and_where(text, bad_at, why):
    data = text.encode()
    ok, _ = _prefixes_ok(data[:bad_at])
    assert ok, why
    assert advance(INITIAL, data[:bad_at + 1]) is None, why


def test_the_limits_themselves_are_taken():
    for text in ('{"a": ' + '9' * MAX_INT_DIGITS + '}', '{\n' + ' ' * MAX_WS_INDENT + '}', '{}\n\t',
                 '{"a": 1e+' + '5' * MAX_INT_DIGITS + '}', '{"\\u00e9\\/": [true, false, null, {}, []]}'):
        state = advance(INITIAL, text.encode())
        assert state is not None and complete(state), text


@pytest.fixture(scope="module")
def model(fixtures_dir):
    return load(fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / MODEL)


@pytest.fixture(scope="module")
def table(model):
    return token_table(model.tokenizer, model.cfg.n_vocab)


@pytest.mark.parametrize("text", ['{"name": "Ünïcode 😀 中文", "n": [1, 2.5e3]}', "  \n\tx\r\u00a0",
                                  "日本語のテキスト"])
def test_token_bytes_spell_the_text(model, table, text):
    ids = model.tokenizer.encode(text).ids
    assert b"".join(table.pieces[i] for i in ids) == text.encode()


def test_added_tokens_are_never_text(model, table):
    for t in ("<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|image_pad|>"):
        assert table.pieces[model.tokenizer.token_to_id(t)] is None
    assert table.first.shape == table.plain.shape == (model.cfg.n_vocab,)


@pytest.mark.parametrize("prefix", ['', '{', '{"ke', '{"key"', '{"key": ', '{"key": "va\\', '{"key": 12',
                                    '{"key": [tr', '{"key": 1}', '{"key": 1}\n '])
def test_admitted_is_every_token_allows(model, table, prefix):
    """The mask (first bytes, plain string text) says of each token what checking it says."""
    form = JsonConstraint(table, model.stop_ids, OBJECT)
    form.state = advance(INITIAL, prefix.encode())
    mask = form.admitted(model.cfg.n_vocab)
    brute = [form.allows(t) for t in range(model.cfg.n_vocab)]
    assert mask.tolist() == brute
    assert 0 < sum(brute) < model.cfg.n_vocab
    ends = [bool(mask[t]) for t in model.stop_ids]
    assert all(ends) if complete(form.state) else not any(ends)


class Allowed:
    """A format over a small vocabulary: the tokens of `ok`."""

    def __init__(self, ok: set[int]):
        self.ok = ok
        self.checked: list[int] = []

    def allows(self, token: int) -> bool:
        self.checked.append(token)
        return token in self.ok

    def admitted(self, n_vocab: int) -> torch.Tensor:
        return torch.tensor([t in self.ok for t in range(n_vocab)])


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_greedy_is_the_likeliest_allowed_token(penalty):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(500, generator=gen) * 3
    history = [int(i) for i in torch.topk(logits, 5).indices]
    p = SamplingParams(repeat_penalty=penalty)
    for ok in ({int(torch.argmax(logits))}, set(range(0, 500, 7)), {int(torch.argmin(logits))}):
        form = Allowed(ok)
        masked = logits.clone()
        masked[[t for t in range(500) if t not in ok]] = float("-inf")
        assert sample_allowed(logits, history, p, gen, form) == sample(masked, history, p, gen)
    first = Allowed(set(range(500)))
    assert sample_allowed(logits, history, p, gen, first) == sample(logits, history, p, gen)
    assert len(first.checked) == 1  # a model keeping to the format: one check a token


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=6),
                                    SamplingParams(temperature=1.2, top_p=0.8, min_p=0.05),
                                    SamplingParams(temperature=1.0, top_k=3)])
def test_draws_follow_llama_cpps_rejection_sampling(params):
    """10,000 draws over 12 tokens, as llama.cpp's common_sampler keeps to a grammar: a token the
    chain keeps, taken if allowed; else one from the chain run over the allowed tokens alone. Each
    token's share within 0.015 of P_kept(t) [t allowed] + P_kept(refused) x P_allowed-chain(t)
    (top-k 3 keeps 0, 1, 2 of which only 1 is allowed: 4 and 7 are drawn too, after a refusal)."""
    logits = torch.tensor([2.0, 1.5, 1.4, 1.0, 0.5, 0.3, 0.0, -0.5, -1.0, -2.0, -3.0, -4.0])
    ok = {1, 4, 7, 10, 11} if params.top_k == 3 else {1, 2, 4, 7, 10, 11}

    def shares(x: torch.Tensor) -> torch.Tensor:
        ids, probs = candidates(x, [], params)
        out = torch.zeros(12, dtype=torch.float64)
        out[ids if ids is not None else torch.arange(12)] = probs.double()
        return out

    first = shares(logits)
    allowed = torch.tensor([t in ok for t in range(12)])
    want = first * allowed + float(first[~allowed].sum()) * shares(logits.masked_fill(~allowed, float("-inf")))
    gen = torch.Generator().manual_seed(7)
    counts = torch.zeros(12)
    for _ in range(10_000):
        counts[sample_allowed(logits, [], params, gen, Allowed(ok))] += 1
    assert (counts / 10_000 - want).abs().max() < 0.015, (counts, want)
    if params.top_k == 3:
        assert counts[7] > 400  # outside the first top-k, drawn after a refusal (top-k 3 of the allowed: 1, 4, 7)


def test_filters_that_keep_no_allowed_token_run_over_the_allowed_ones():
    """top_k 2 keeps tokens 0 and 1, both refused: the draw is top_k 2 over the allowed (5 and 9)."""
    logits = torch.tensor([9.0, 8.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 2.9, 0.0])
    gen = torch.Generator().manual_seed(1)
    drawn = {sample_allowed(logits, [], SamplingParams(temperature=1.0, top_k=2), gen, Allowed({5, 6, 9}))
             for _ in range(200)}
    assert drawn == {5, 9}
    with pytest.raises(FormatError, match="no token"):
        sample_allowed(logits, [], SamplingParams(temperature=1.0), gen, Allowed(set()))
    with pytest.raises(FormatError, match="no token"):
        sample_allowed(logits, [], SamplingParams(), gen, Allowed(set()))


@pytest.mark.parametrize("kwargs", [dict(), dict(repeat_penalty=1.3), dict(temperature=0.9, seed=3),
                                    dict(temperature=1.0, top_k=40, top_p=0.9, seed=1)])
def test_the_models_answer_is_json(model, monkeypatch, kwargs):
    """The answer is a JSON object or the prefix of one (json.loads reads it where it ended); greedy,
    each token is the likeliest of those a fresh parse of the answer so far allows."""
    seen = []
    real = model_module.sample_allowed

    def recording(logits, history, p, gen, form):
        state = form.state
        tok = real(logits, history, p, gen, form)
        seen.append((logits.clone(), history[:] if p.repeat_penalty != 1.0 else [], state, tok))
        return tok

    monkeypatch.setattr(model_module, "sample_allowed", recording)
    g = model.generate("Describe a cat as JSON.", max_new_tokens=24, format="json", **kwargs)
    assert len(seen) == len(g.token_ids) + g.ended
    ok, _ = _prefixes_ok(g.text.encode())
    assert ok and g.text.startswith("{"), g.text
    if g.ended:
        assert isinstance(json.loads(g.text), dict)
    if "temperature" in kwargs:
        return
    pieces = token_table(model.tokenizer, model.cfg.n_vocab).pieces
    state = INITIAL
    for logits, history, _, tok in seen:  # tok is taken, every token scored above it is refused
        scores = _penalized(logits, history, SamplingParams(repeat_penalty=kwargs.get("repeat_penalty", 1.0)))
        above = torch.nonzero(scores > scores[tok]).flatten().tolist()
        assert all(not complete(state) if t in model.stop_ids
                   else pieces[t] is None or advance(state, pieces[t]) is None for t in above)
        if tok in model.stop_ids:
            assert complete(state)
        else:
            state = advance(state, pieces[tok])
            assert state is not None


def test_a_format_other_than_json_is_refused(model):
    with pytest.raises(model_module.ModelError, match="format 'xml': 'json'"):
        model.generate("x", format="xml")


def test_qvl_run_format_json(fixtures_dir, model):
    path = fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / MODEL
    want = model.generate("Describe a cat.", max_new_tokens=10, format="json")
    result = CliRunner().invoke(run_app, [str(path), "-p", "Describe a cat.", "-n", "10", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == want.text.strip() and want.text.startswith("{")
    bad = CliRunner().invoke(run_app, [str(path), "-p", "x", "--format", "yaml"])
    assert bad.exit_code == 2 and bad.output.strip() == \
        "qvl-run: error: --format yaml: json, a JSON schema file or a schema inline ('{...}'); no such file"
