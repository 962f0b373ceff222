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
    assert seen == [set(), 1, set(), 12, set(), 12] and model.stop_ids == stops and len(test.seconds) == 2  # warm-up


@pytest.mark.parametrize("args,message", [
    (["--image-size", "10x10"], "--image-size 10x10: WIDTHxHEIGHT, each 28 or more, or none"),
    (["-r", "0"], "-r 0: 1 or more"),
    (["-p", "-1"], "-p -1: 0 or more"),
    (["-n", "8,x"], "-n 8,x: whole numbers, comma-separated"),
    (["-pg", "8"], "-pg 8: P,G (prompt tokens, generated tokens)"),
    (["-o", "sql"], "-o sql: one of md, csv, json, jsonl"),
])
def test_bench_errors(path, args, message):
    r = CliRunner().invoke(app, ["bench", str(path), *args])
    assert r.exit_code == 2 and r.stderr.strip() == f"qvl bench: error: {message}"


def test_bench_missing_model(tmp_path, monkeypatch):
    monkeypatch.setenv("QVL_MODELS", str(tmp_path))
    r = CliRunner().invoke(app, ["bench", str(tmp_path / "nope.gguf"), "--image-size", "none"])
    assert r.exit_code == 2 and r.stderr.startswith("qvl bench: error: ") and r.stderr.count("\n") == 1


def test_lists_depths_and_llama_benchs_outputs(path):
    """-p / -n / -d lists and -pg, named and ordered as llama-bench's (" @ dD", by depth); -o json's
    records carry its fields, csv its header, jsonl a record a line."""
    args = ["bench", str(path), "-p", "8,16", "-n", "4", "-pg", "8,4", "-d", "0,24", "-r", "2", "--image-size", "none"]
    r = CliRunner().invoke(app, [*args, "-o", "json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [row["test"] for row in rows] == ["pp8", "pp16", "tg4", "pp8+tg4", "pp8 @ d24", "pp16 @ d24", "tg4 @ d24",
                                             "pp8+tg4 @ d24"]
    assert [(row["n_prompt"], row["n_gen"], row["n_depth"]) for row in rows][3:5] == [(8, 4, 0), (8, 0, 24)]
    for row in rows:
        assert set(bench.FIELDS) <= set(row) and len(row["samples_ns"]) == len(row["samples_ts"]) == 2
        tokens = row["n_prompt"] + row["n_gen"]
        assert row["samples_ts"] == pytest.approx([tokens * 1e9 / ns for ns in row["samples_ns"]], rel=1e-6)
        assert row["avg_ts"] == pytest.approx(sum(row["samples_ts"]) / 2) and row["n_gpu_layers"] == 0
    r = CliRunner().invoke(app, [*args[:-4], "-d", "24", "-r", "1", "--image-size", "none", "-o", "csv"])
    lines = r.stdout.splitlines()
    assert r.exit_code == 0 and lines[0] == ",".join(bench.FIELDS) and len(lines) == 1 + 4
    assert [line.split(",")[bench.FIELDS.index("test")] for line in lines[1:]] == [
        "pp8 @ d24", "pp16 @ d24", "tg4 @ d24", "pp8+tg4 @ d24"]
    r = CliRunner().invoke(app, ["bench", str(path), "-p", "8", "-n", "0", "-r", "1", "--image-size", "none",
                                 "-o", "jsonl"])
    assert r.exit_code == 0 and [json.loads(line)["test"] for line in r.stdout.splitlines()] == ["pp8"]


def test_a_depth_is_read_once_and_not_timed(path):
    """After a warm-up of the test's shape (a prompt of its size, one token), the context at a
    depth is read once before the repetitions, each of which reuses it: the timed prompt reads
    only the test's own tokens."""
    model = load(path)
    seen = []
    real = model.generate

    def recording(prompt, *args, **kwargs):
        g = real(prompt, *args, **kwargs)
        seen.append((len(prompt), kwargs["max_new_tokens"], g.prompt_tokens - g.reused_tokens))
        return g

    model.generate = recording
    test = bench.measured(model, 8, 0, 24, 2, 1)
    assert test.name == "pp8 @ d24" and seen[:2] == [(8, 1, 8), (24, 0, 24)]
    assert [(n, m) for n, m, _ in seen[2:]] == [(32, 1), (32, 1)] and all(read <= 9 for _, _, read in seen[2:])
    seen.clear()
    test = bench.measured(model, 0, 5, 24, 2, 1)
    assert test.name == "tg5 @ d24" and [(n, m) for n, m, _ in seen] == [(1, 1), (24, 0), (24, 5), (24, 5)]
    assert all(read <= 1 for _, _, read in seen[2:])  # the depth reused: at most its last token read again
