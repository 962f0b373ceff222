"""`qvl embed` (embed_cli.py): the vectors /api/embed gives for the same texts, from arguments or
standard input's lines; bad input is one line and exit 2."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from qvl.runtime.cli import app

runner = CliRunner()


def test_embed_prints_what_api_embed_answers(running, files):
    path = str(files / "tiny-qwen2.5-vl-f16.gguf")
    texts = ["The cat sat on the mat", "A dog"]
    out = runner.invoke(app, ["embed", path, *texts, "--cpu"])
    assert out.exit_code == 0, out.output
    got = json.loads(out.stdout)
    want = running.json("/api/embed", {"model": "tiny:1", "input": texts})
    assert got["prompt_eval_count"] == want["prompt_eval_count"] and len(got["embeddings"]) == 2
    assert np.allclose(got["embeddings"], want["embeddings"], atol=1e-6)
    piped = runner.invoke(app, ["embed", path, "--cpu", "--dimensions", "5", "--no-normalize"],
                          input="The cat sat on the mat\n\nA dog\n")
    raw = json.loads(piped.stdout)["embeddings"]
    full = runner.invoke(app, ["embed", path, "--cpu", "--no-normalize", "A dog"])
    assert len(raw) == 2 and raw[1] == json.loads(full.stdout)["embeddings"][0][:5]
    assert abs(np.linalg.norm(raw[1]) - 1) > 1e-3  # not normalized


def test_embed_errors(files):
    path = str(files / "tiny-qwen2.5-vl-f16.gguf")
    for args, says in ((["/nowhere.gguf", "hi"], "/nowhere.gguf: file not found"),
                       ([path, "--dimensions", "0", "hi"], "--dimensions 0: 1 to the model's 64"),
                       ([path, ""], "an empty text has no embedding")):
        out = runner.invoke(app, ["embed", *args, "--cpu"])
        assert out.exit_code == 2 and out.output.strip().splitlines() == [f"qvl: error: {says}"], out.output
    out = runner.invoke(app, ["embed", path, "--cpu"], input="")
    assert out.exit_code == 2 and "no text to embed" in out.output
