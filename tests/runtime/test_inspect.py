"""`qvl inspect` on llama.cpp's files and on junk."""

from __future__ import annotations

from typer.testing import CliRunner

from qvl.runtime.cli import app

runner = CliRunner()


def test_inspect_llama_cpp_file(fixtures_dir):
    r = runner.invoke(app, ["inspect", str(fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf")])
    assert r.exit_code == 0, r.output
    assert "general.architecture" in r.output and "'qwen2vl'" in r.output
    assert "(151936 x string)" in r.output  # the vocabulary is summarised, not dumped
    assert "(294166 x string)" in r.output
    assert len(r.output.splitlines()) < 80
    assert "token_embd.weight" in r.output and "[64, 151936]" in r.output and "18.5 MiB" in r.output
    assert "38 tensors" in r.output


def test_inspect_a_split_model(fixtures_dir, tmp_path):
    """Its first part: every part's tensors, each with the part that holds it."""
    from gguf_compare import split_gguf

    first = split_gguf(fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf", tmp_path / "m.gguf",
                       12)[0]
    r = runner.invoke(app, ["inspect", str(first)])
    assert r.exit_code == 0, r.output
    assert "38 tensors in 4 files (m-00002-of-00004.gguf, m-00003-of-00004.gguf, m-00004-of-00004.gguf after" in r.output
    rows = [line for line in r.output.splitlines() if " MiB  part " in line or " KiB  part " in line or " B  part " in line]
    assert len(rows) == 38 and {row.split()[-1] for row in rows} == {"1", "2", "3", "4"}
    assert "token_embd.weight" in rows[0] and rows[0].endswith("part 1")


def test_inspect_full_prints_arrays(fixtures_dir):
    r = runner.invoke(app, ["inspect", "--full", str(fixtures_dir / "tiny-qwen2-vl" / "llamacpp" / "mmproj-tiny-qwen2-vl-f16.gguf")])
    assert r.exit_code == 0, r.output
    assert "clip.vision.image_mean" in r.output and "0.481455" in r.output


def test_inspect_rejects_non_gguf(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_text("hello, not a model")
    r = runner.invoke(app, ["inspect", str(bad)])
    assert r.exit_code == 2
    assert r.stderr.strip().startswith("qvl inspect: error:") and "not a GGUF" in r.stderr


def test_run_rejects_a_missing_model(tmp_path):
    r = runner.invoke(app, ["run", str(tmp_path / "model.gguf"), "--prompt", "hi"])
    assert r.exit_code == 2 and r.stderr.startswith("qvl-run: error:") and "not found" in r.stderr
