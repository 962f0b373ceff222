"""Stop strings: StopStrings on crafted text, then Model.generate, qvl-run --stop and a stored
PARAMETER stop on the tiny model (greedy, so the cut answer must be the uncut one's start)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qvl.runtime.loader import load
from qvl.runtime.run_cli import app
from qvl.runtime.store import Store
from qvl.runtime.tokenizer import StopStrings


def _feed(stops, texts):
    s = StopStrings(stops)
    return [s.feed(t) for t in texts], s.hit


@pytest.mark.parametrize("stops,texts,shown,hit", [
    (["o W"], ["Hel", "Hello Wo", "Hello World"], ["Hel", "l", ""], 4),  # found across pieces
    (["END"], ["abcE", "abcEN", "abcENx", "abcENxy"], ["abc", "", "ENx", "y"], None),  # held, then let go
    (["END"], ["abcE", "abcEND"], ["abc", ""], 3),
    (["c", "ab"], ["xabc"], ["x"], 1),  # the earliest of several
    (["", "zz"], ["abc", "abcd"], ["abc", "d"], None),  # an empty stop string is none
    (["aa"], ["a", "aa"], ["", ""], 0),  # the answer's very start
])
def test_stop_strings(stops, texts, shown, hit):
    assert _feed(stops, texts) == (shown, hit)


@pytest.fixture(scope="module")
def path(fixtures_dir):
    return fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf"


@pytest.fixture(scope="module")
def answer(path):
    """A greedy answer with a stop string that first occurs inside it, not at its start."""
    model = load(path)
    for prompt in ("Describe it.", "What is this?", "Tell me a story.", "Hi"):
        g = model.generate(prompt, max_new_tokens=16)
        for k in range(1, len(g.text) - 2):
            stop = g.text[k:k + 2]
            if g.text.find(stop) == k and stop.strip():
                return model, prompt, g, stop, k
    pytest.fail("no greedy answer of the tiny model has a stop string to cut at")


def test_generate_ends_before_a_stop_string(answer):
    model, prompt, full, stop, k = answer
    cut = model.generate(prompt, max_new_tokens=16, stop=["never there", stop])
    assert cut.text == full.text[:k] and cut.ended
    assert full.token_ids[:len(cut.token_ids)] == cut.token_ids and len(cut.token_ids) < len(full.token_ids)
    assert "".join(model.generate(prompt, max_new_tokens=16, stop=[stop], stream=True)) == cut.text
    kept = model.generate(prompt, max_new_tokens=16, stop=["never there"])
    assert kept.text == full.text and not kept.ended


def test_qvl_run_stop_and_a_stored_stop(answer, path, tmp_path, monkeypatch):
    _, prompt, full, stop, k = answer
    runner = CliRunner()
    r = runner.invoke(app, [str(path), "-p", prompt, "-n", "16", "--stop", stop, "-r", "never there", "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["text"] == full.text[:k] and json.loads(r.stdout)["done_reason"] == "stop"
    monkeypatch.setenv("QVL_MODELS", str(tmp_path))
    Store().create("cut:1", path, params={"stop": [stop]})
    r = runner.invoke(app, ["cut:1", "-p", prompt, "-n", "16", "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["text"] == full.text[:k]
    r = runner.invoke(app, ["cut:1", "-p", prompt, "-n", "16", "--json", "--stop", "never there"])  # the flag wins
    assert json.loads(r.stdout)["text"] == full.text and json.loads(r.stdout)["done_reason"] == "length"
