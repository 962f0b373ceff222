"""qvl-run --each: one answer for each picture, the model loaded once, in the pictures' order;
each answer what a run on that picture alone gives; a picture that fails skipped (exit 1)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from qvl.runtime.run_cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pics")
    rng = np.random.default_rng(3)
    paths = []
    for i, size in enumerate([(60, 90), (84, 56), (70, 70)]):
        p = folder / f"p{i}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def _alone(tiny_gguf, picture):
    r = runner.invoke(app, [tiny_gguf, "--image", picture, "-p", "What is it?", "-n", "5", "--json"])
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def test_each_picture_answered_as_alone(tiny_gguf, pictures):
    args = [tiny_gguf, *[a for p in pictures for a in ("--image", p)], "-p", "What is it?", "-n", "5"]
    r = runner.invoke(app, [*args, "--each", "--json"])
    assert r.exit_code == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["image"] for x in lines] == pictures
    for line, picture in zip(lines, pictures):
        alone = _alone(tiny_gguf, picture)
        assert line["text"] == alone["text"] and line["token_ids"] == alone["token_ids"]
        assert line["prompt_tokens"] == alone["prompt_tokens"]
    assert lines[0]["timings"]["load_s"] > 0 and lines[1]["timings"]["load_s"] == 0
    plain = runner.invoke(app, [*args, "--each"])
    assert plain.stdout.splitlines() == [f"{p}: {x['text']}" for p, x in zip(pictures, lines)]
    streamed = runner.invoke(app, [*args, "--each", "--stream"])
    assert streamed.stdout == plain.stdout


def test_a_picture_that_fails_is_skipped(tiny_gguf, pictures, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a picture")
    r = runner.invoke(app, [tiny_gguf, "--image", pictures[0], "--image", str(junk), "--image", pictures[1],
                            "-p", "What is it?", "-n", "3", "--each"])
    assert r.exit_code == 1
    assert [line.split(": ")[0] for line in r.stdout.splitlines()] == [pictures[0], pictures[1]]
    assert f"qvl-run: error: {junk}: not a readable image" in r.stderr


@pytest.mark.parametrize("extra,message", [
    ([], "--each: give the pictures with --image"),
    (["--image", "{p}", "--boxes", "{out}"], "with --each: name each picture's file with {stem} or {name}"),
])
def test_each_refuses(tiny_gguf, pictures, tmp_path, extra, message):
    extra = [a.replace("{p}", pictures[0]).replace("{out}", str(tmp_path / "b.png")) for a in extra]
    r = runner.invoke(app, [tiny_gguf, "-p", "x", "--each", *extra])
    assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_each_pictures_boxes_in_a_file_of_its_own(tiny_gguf, pictures, tmp_path):
    answer = '[{"bbox_2d": [0, 0, 28, 28], "label": "x"}]'
    r = runner.invoke(app, [tiny_gguf, "--image", pictures[0], "--image", pictures[1], "-p", "Outline it.", "-n", "40",
                            "--grammar", "root ::= " + json.dumps(answer), "--each", "--json",
                            "--boxes", str(tmp_path / "{stem}-boxes.png")])
    assert r.exit_code == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert [len(x["boxes"]) for x in lines] == [1, 1]
    for picture in pictures[:2]:
        drawn = Image.open(tmp_path / f"{picture.rsplit('/', 1)[1][:-4]}-boxes.png")
        assert drawn.size == Image.open(picture).size
