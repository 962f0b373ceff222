"""`qvl bench`: llama-bench's tests on the tiny model (what is measured and reported, not how fast)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qvl.runtime import bench
from qvl.runtime.cli import app
from qvl.runtime.loader import load

MODEL = "tiny-qwen2.5-vl-f16.gguf"


@pytest.fixture(scope="module")
def path(fixtures_dir):
    return fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / MODEL


def test_bench_json_and_table(path):
    r = CliRunner().invoke(app, ["bench", str(path), "-p", "32", "-n", "8", "-r", "2", "--image-size", "56x84",
                                 "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["model"] == "qwen2vl 10M F16" and out["backend"].startswith("CPU (")
    assert out["size"] == path.stat().st_size + (path.parent / f"mmproj-{MODEL}").stat().st_size
    assert [(t["test"], t["tokens"]) for t in out["tests"]] == [("pp32", 32), ("tg8", 8), ("img56x84", 6)]
    for t in out["tests"]:
        assert len(t["seconds"]) == 2 and all(s > 0 for s in t["seconds"])
        assert t["tok_s"] == pytest.approx([t["tokens"] / s for s in t["seconds"]])
    r = CliRunner().invoke(app, ["bench", str(path), "-p", "16", "-n", "0", "-r", "1", "--image-size", "none"])
    lines = r.stdout.splitlines()
    assert r.exit_code == 0 and len(lines) == 3
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == ["model", "size", "params", "backend", "test", "t/s"]
    assert lines[2].split("|")[5].strip() == "pp16" and "±" in lines[2]


def test_text_generation_runs_past_end_of_turn_tokens(path):
    """tgN generates N tokens whatever they are: the end-of-turn tokens do not end it, and are
    back in force afterwards."""
    model = load(path)
    stops = set(model.stop_ids)
    seen = []
    real = model.generate

    def recording(*args, **kwargs):
        seen.append(set(model.stop_ids))
        g = real(*args, **kwargs)
        seen.append(len(g.token_ids))
        return g

    model.generate = recording
    test = bench.text_generation(model, 12, 2)
    assert seen == [set(), 12, set(), 12] and model.stop_ids == stops and len(test.seconds) == 2


@pytest.mark.parametrize("args,message", [
    (["--image-size", "10x10"], "--image-size 10x10: WIDTHxHEIGHT, each 28 or more, or none"),
    (["-r", "0"], "-r 0: 1 or more"),
    (["-p", "-1"], "-p -1: 0 or more"),
])
def test_bench_errors(path, args, message):
    r = CliRunner().invoke(app, ["bench", str(path), *args])
    assert r.exit_code == 2 and r.stderr.strip() == f"qvl bench: error: {message}"


def test_bench_missing_model(tmp_path, monkeypatch):
    monkeypatch.setenv("QVL_MODELS", str(tmp_path))
    r = CliRunner().invoke(app, ["bench", str(tmp_path / "nope.gguf"), "--image-size", "none"])
    assert r.exit_code == 2 and r.stderr.startswith("qvl bench: error: ") and r.stderr.count("\n") == 1
