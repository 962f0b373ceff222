"""GBNF token references (llama.cpp's `<[id]>`, `<text>`, `!<[id]>`): a whole token where the
grammar names one, any token but one where it negates one; text tokens resolved by the model's
tokenizer; answers that keep to them, end-of-turn tokens included."""

from __future__ import annotations

import json

import pytest
import torch

from qvl.runtime.gbnf import GrammarError, parse_gbnf, resolve_tokens
from qvl.runtime.json_format import JsonConstraint, token_table
from qvl.runtime.json_grammar import TOKEN_BASE, TokenRef
from qvl.runtime.loader import load
from qvl.runtime.model import ModelError

THINK, END_THINK = 1000, 1001


def take(grammar, items):
    """The state after `items`: strings read as their bytes, ints as whole tokens (None: refused)."""
    state = grammar.initial
    for item in items:
        if isinstance(item, int):
            state = grammar.step(state, TOKEN_BASE + item)
        else:
            state = grammar.advance(state, item.encode())
        if state is None:
            return None
    return state


def accepts(grammar, items) -> bool:
    state = take(grammar, items)
    return state is not None and grammar.complete(state)


# llama.cpp's README example: <[1000]> = <think>, <[1001]> = </think>
THINKING = "root ::= <[1000]> thinking <[1001]> .*\nthinking ::= !<[1001]>*\n"


@pytest.mark.parametrize("items,ok", [
    ([THINK, END_THINK], True), ([THINK, 5, 77, THINK, END_THINK, "after"], True),
    ([THINK, 5], False), ([END_THINK], False), ([THINK, END_THINK, END_THINK], False),
    (["<think>", END_THINK], False),  # its text is not the token
    ([THINK, "x", END_THINK], False),  # inside, tokens only: a byte is no token
])
def test_token_references_take_whole_tokens(items, ok):
    assert accepts(parse_gbnf(THINKING), items) is ok


def test_tokens_between_bytes():
    g = parse_gbnf('root ::= "x" <[7]> [a-z]+ (<[8]> | "!")\n')
    assert accepts(g, ["x", 7, "ab", 8]) and accepts(g, ["x", 7, "a!"])
    assert take(g, ["x7"]) is None and take(g, ["x", 8]) is None and take(g, [7]) is None
    assert not accepts(g, ["x", 7, "ab"])


def test_parsed_forms():
    g = parse_gbnf('root ::= <[12]> !<[3]> <|box_start|> !</think>\n')
    refs = [n for n in g.nodes if isinstance(n, TokenRef)]
    assert refs == [TokenRef((12,)), TokenRef((3,), True), TokenRef((), False, "<|box_start|>"),
                    TokenRef((), True, "</think>")]


@pytest.fixture(scope="module")
def model(fixtures_dir):
    return load(fixtures_dir / "tiny-qwen2-vl" / "llamacpp" / "tiny-qwen2-vl-f16.gguf")


def test_text_tokens_resolved_by_the_tokenizer(model):
    tok = model.tokenizer
    g = resolve_tokens(parse_gbnf("root ::= <|box_start|> !<|box_end|>* <|box_end|>\n"), tok)
    refs = [n for n in g.nodes if isinstance(n, TokenRef)]
    assert refs == [TokenRef((tok.token_to_id("<|box_start|>"),)), TokenRef((tok.token_to_id("<|box_end|>"),), True),
                    TokenRef((tok.token_to_id("<|box_end|>"),))]
    assert g.named_tokens == {151648, 151649}
    plain = parse_gbnf('root ::= "a"\n')
    assert resolve_tokens(plain, tok) is plain and plain.named_tokens is None
    n = len(tok.encode("<think>", add_special_tokens=False).ids)
    assert n > 1  # Qwen2's vocabulary has no <think> token
    for text, expect in [("root ::= <think>\n", f"token <think> is {n} tokens of this model's vocabulary, not one"),
                         ("root ::= !<[151665]>\n", "token <[151665]> is not in this model's vocabulary (ids 0 to "
                                                    "151664)")]:
        with pytest.raises(GrammarError) as e:
            resolve_tokens(parse_gbnf(text), tok)
        assert expect in str(e.value)
    with pytest.raises(ModelError, match=f"grammar: token <think> is {n} tokens"):
        model.generate("x", format=parse_gbnf("root ::= <think>\n"), max_new_tokens=2)


def _mask_agrees_with_allows(form, n_vocab):
    allowed = torch.tensor([form.allows(t) for t in range(n_vocab)])
    assert torch.equal(form.admitted(n_vocab), allowed)
    return allowed


def test_admitted_mask_is_what_allows_says(model):
    """The vocabulary mask a draw uses against the token-by-token check, at states where a token
    is named, where any token but one goes, and where bytes and a token both may come next."""
    tok, n_vocab = model.tokenizer, model.cfg.n_vocab
    box, box_end = tok.token_to_id("<|box_start|>"), tok.token_to_id("<|box_end|>")
    g = resolve_tokens(parse_gbnf('root ::= <|box_start|> !<|box_end|>{0,2} (<|box_end|> | "z")\n'), tok)
    form = JsonConstraint(token_table(tok, n_vocab), model.stop_ids, g)
    allowed = _mask_agrees_with_allows(form, n_vocab)
    assert torch.nonzero(allowed).flatten().tolist() == [box]
    form.accept(box)
    allowed = _mask_agrees_with_allows(form, n_vocab)  # any real token, end-of-turn ones not yet
    assert int(allowed.sum()) == tok.get_vocab_size(with_added_tokens=True) - len(model.stop_ids)
    assert not allowed[tok.get_vocab_size(with_added_tokens=True):].any()  # the logits' padding: no tokens
    form.accept(tok.token_to_id("a"))
    form.accept(box)
    allowed = _mask_agrees_with_allows(form, n_vocab)  # {0,2} used up: </box> or bytes starting with z
    zs = {t for t in range(n_vocab) if form.pieces[t] == b"z"}
    assert allowed[box_end] and all(allowed[t] for t in zs)
    assert set(torch.nonzero(allowed).flatten().tolist()) == {box_end} | zs
    form.accept(box_end)
    assert form.done and torch.nonzero(_mask_agrees_with_allows(form, n_vocab)).flatten().tolist() == sorted(
        t for t in model.stop_ids if t < n_vocab)


def test_answers_keep_to_token_references(model):
    tok = model.tokenizer
    vs, ve = tok.token_to_id("<|vision_start|>"), tok.token_to_id("<|vision_end|>")
    grammar = parse_gbnf("root ::= <|vision_start|> !<|vision_end|>{2,5} <|vision_end|>\n")
    for temperature, seed in [(0.0, 0), (1.0, 1), (1.0, 2)]:
        out = model.generate("Go.", format=grammar, max_new_tokens=12, temperature=temperature, seed=seed)
        ids = out.token_ids
        assert ids[0] == vs and ids[-1] == ve and 2 <= len(ids) - 2 <= 5 and ve not in ids[1:-1], ids
        assert out.ended


def test_an_end_of_turn_token_a_grammar_names_ends_the_answer(model):
    out = model.generate("Go.", format=parse_gbnf('root ::= "hi" <|im_end|> "never"\n'), max_new_tokens=8)
    assert out.text == "hi" and out.ended


def test_qwen2_vl_box_tokens_forced_by_a_grammar(model):
    grammar = parse_gbnf('root ::= "Box: " <|box_start|> "(1,2),(3,4)" <|box_end|>\n')
    out = model.generate("Where?", format=grammar, max_new_tokens=20)
    assert out.text == "Box: (1,2),(3,4)" and out.ended
    assert model.tokenizer.decode(out.token_ids, skip_special_tokens=False) == "Box: <|box_start|>(1,2),(3,4)<|box_end|>"


def test_serve_refuses_a_token_the_model_lacks(running):
    body = {"model": "tiny:1", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}],
            "grammar": "root ::= <think>"}
    status, data = running.request("/v1/chat/completions", body)
    assert status == 400 and "token <think> is" in json.loads(data)["error"], data
