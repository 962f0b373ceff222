"""`qvl-run --prompt-cache FILE` (runtime/kv_file.py): a cache written by one model instance and
read by another gives what the in-memory reuse gives, bit for bit, and within float32 rounding
what a fresh run gives, without encoding the picture again; a file made under other settings, or
not a cache, is not used (one warning line); the flags' misuses are one-line errors."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from qvl.runtime import kv_file
from qvl.runtime.loader import load
from qvl.runtime.prompt_cache import MediaSpan, PromptKeys
from qvl.runtime.run_cli import app
from qvl.runtime.video import VideoOptions

FRESH_TOL = 1e-4  # a token's log-probability: the shared part read in another prefill pass (M differs: ~1e-6)


@pytest.fixture(scope="module")
def model_path(fixtures_dir):
    return fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf"


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    return Image.fromarray(np.random.default_rng(5).integers(0, 256, (90, 130, 3), dtype=np.uint8))


def _scores(g):
    return [(t.token, t.logprob) for t in g.logprobs]


def test_a_cache_from_the_file_is_the_kept_cache(model_path, picture, tmp_path):
    path = tmp_path / "page.kv"
    first = load(model_path, device="cpu")
    g1 = first.generate("What is this?", [picture], max_new_tokens=4)
    n = kv_file.save(first, path)
    assert n == g1.prompt_tokens + len(g1.token_ids)  # the prompt and the answer fed back
    in_memory = first.generate("What colour is it?", [picture], max_new_tokens=6, logprobs=3)

    second = load(model_path, device="cpu")
    assert kv_file.restore(second, path) == (n, None)
    g2 = second.generate("What colour is it?", [picture], max_new_tokens=6, logprobs=3)
    ids = _prompt_ids(second, "What colour is it?", picture)
    after_picture = ids.index(second.image_pad_id) + ids.count(second.image_pad_id)
    assert g2.reused_tokens == in_memory.reused_tokens > after_picture
    assert "vision_ms" not in g2.timings  # the picture was not encoded again
    assert _scores(g2) == _scores(in_memory)  # the same keys and values, read back exactly

    fresh = load(model_path, device="cpu").generate("What colour is it?", [picture], max_new_tokens=6, logprobs=3)
    assert fresh.reused_tokens == 0 and "vision_ms" in fresh.timings
    assert g2.token_ids == fresh.token_ids
    assert max(abs(a[1] - b[1]) for a, b in zip(_scores(g2), _scores(fresh))) <= FRESH_TOL


def test_another_picture_reuses_only_the_text_before_it(model_path, picture, tmp_path):
    path = tmp_path / "a.kv"
    model = load(model_path, device="cpu")
    model.generate("What is this?", [picture], max_new_tokens=2)
    kv_file.save(model, path)
    other = load(model_path, device="cpu")
    kv_file.restore(other, path)
    flipped = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # same size, other pixels
    g = other.generate("What is this?", [flipped], max_new_tokens=2)
    assert "vision_ms" in g.timings
    assert g.reused_tokens == _prompt_ids(other, "What is this?", flipped).index(other.image_pad_id) > 0


def _prompt_ids(model, question, image):
    text, images, _ = model._prepare(question, [image], None, VideoOptions(), None, True)
    return model.tokenize(text, images)[0]


def test_prompt_keys_move_between_tables():
    """export / adopt: pictures' identities by hash, whatever index another process gave them."""
    rng = np.random.default_rng(0)
    a, b, c = (MediaSpan(0, 4, False, rng.random((16, 12)).astype(np.float32), (1, 4, 4)) for _ in range(3))
    here = PromptKeys()
    here.keys([0] * 4, [c])  # c takes index 0 here
    kept = here.keys([7, 8, 0, 0, 0, 0, 9, 0, 0, 0, 0], [MediaSpan(2, 4, False, a.pixels, a.grid_thw),
                                                       MediaSpan(7, 4, False, b.pixels, b.grid_thw)])
    here.kept = kept
    keys, hashes = here.export()
    assert len(hashes) == 2 and keys[:2] == [7, 8] and keys[2] == -1 and keys[7] == -(1 + (1 << 20))
    there = PromptKeys()
    there.keys([0] * 4, [b])  # b takes index 0 there
    there.adopt(keys, hashes)
    again = there.keys([7, 8, 0, 0, 0, 0, 9, 0, 0, 0, 0, 5], [MediaSpan(2, 4, False, a.pixels, a.grid_thw),
                                                             MediaSpan(7, 4, False, b.pixels, b.grid_thw)])
    assert there.kept == again[:11] and there.reusable(again, []) == 11


runner = CliRunner()


def _run(model_path, image, question, *flags):
    r = runner.invoke(app, [str(model_path), "--image", str(image), "-p", question, "-n", "5", "--json", *flags])
    return r, (json.loads(r.stdout) if r.exit_code == 0 else None)


def test_the_flag_across_runs(model_path, picture, tmp_path):
    image = tmp_path / "p.png"
    picture.save(image)
    cache = tmp_path / "p.kv"
    r, first = _run(model_path, image, "What is this?", "--prompt-cache", str(cache))
    assert r.exit_code == 0 and cache.is_file() and "vision_ms" in first["timings"], r.stderr
    written = cache.read_bytes()
    r, second = _run(model_path, image, "What colour?", "--prompt-cache", str(cache), "--prompt-cache-ro")
    assert r.exit_code == 0 and "vision_ms" not in second["timings"] and r.stderr == "", r.stderr
    assert first["reused_tokens"] == 0 and 0 < second["reused_tokens"] < second["prompt_tokens"]
    assert cache.read_bytes() == written  # -ro: used, not updated
    _, alone = _run(model_path, image, "What colour?")
    assert second["token_ids"] == alone["token_ids"] and second["prompt_tokens"] == alone["prompt_tokens"]
    r, _ = _run(model_path, image, "What colour?", "--prompt-cache", str(cache))
    assert cache.read_bytes() != written and not list(tmp_path.glob(".p.kv.*"))

    moved = tmp_path / "copy.gguf"  # the same weights in another file: other settings, not used
    shutil.copy(model_path, moved)
    shutil.copy(model_path.with_name("mmproj-" + model_path.name), moved.with_name("mmproj-copy.gguf"))
    r, third = _run(moved, image, "What colour?", "--prompt-cache", str(cache), "--prompt-cache-ro")
    assert r.exit_code == 0 and "vision_ms" in third["timings"]
    assert r.stderr.strip() == (f"qvl-run: warning: {cache}: made with another model file or other settings; "
                                "the prompt is read whole")
    assert third["token_ids"] == alone["token_ids"]

    junk = tmp_path / "junk.kv"
    junk.write_bytes(os.urandom(64))
    r, fourth = _run(model_path, image, "What colour?", "--prompt-cache", str(junk))
    assert r.exit_code == 0 and "not a prompt cache qvl can read" in r.stderr and r.stderr.count("\n") == 1
    assert fourth["token_ids"] == alone["token_ids"] and junk.stat().st_size > 64  # replaced by a cache


def test_a_q8_0_cache_round_trip(model_path, picture, tmp_path):
    image = tmp_path / "p.png"
    picture.save(image)
    cache = tmp_path / "q8.kv"
    flags = ("--cache-type", "q8_0", "--prompt-cache", str(cache))
    assert _run(model_path, image, "What is this?", *flags)[0].exit_code == 0
    r, second = _run(model_path, image, "What colour?", *flags)
    assert r.exit_code == 0 and "vision_ms" not in second["timings"], r.stderr
    _, alone = _run(model_path, image, "What colour?", "--cache-type", "q8_0")
    assert second["token_ids"] == alone["token_ids"]
    r, third = _run(model_path, image, "What colour?", "--prompt-cache", str(cache))  # f32 cache: other settings
    assert "other settings" in r.stderr and "vision_ms" in third["timings"]


def test_the_terminal_chat_writes_it_after_each_answer(model_path, picture, tmp_path, monkeypatch, capsys):
    """A chat with --prompt-cache: the file written after each answer; the next chat about the same
    picture reads its first question after the picture from the file (the picture not encoded)."""
    import builtins

    from qvl.runtime import chat_cli

    image = tmp_path / "p.png"
    picture.save(image)
    path = tmp_path / "chat.kv"
    gen = dict(max_new_tokens=3)

    def chat(lines, model):
        feed = iter(lines)
        monkeypatch.setattr(builtins, "input", lambda prompt="": next(feed))
        try:
            chat_cli.interactive(model, gen, [str(image)], None, lambda: kv_file.save(model, path))
        except StopIteration:  # the lines ran out
            pass

    first = load(model_path, device="cpu")
    chat(["What is this?"], first)
    written = path.read_bytes()
    chat(["And the colour?"], first)  # the second turn: the file now holds both
    assert path.read_bytes() != written and first.last_generation.reused_tokens > 0
    second = load(model_path, device="cpu")
    assert kv_file.restore(second, path)[1] is None
    chat(["Who made it?"], second)
    g = second.last_generation
    assert "vision_ms" not in g.timings and g.reused_tokens == _prompt_ids(second, "x", picture).index(
        second.image_pad_id) + _prompt_ids(second, "x", picture).count(second.image_pad_id) + 1  # and vision_end


def test_misuses_are_one_line(model_path, tmp_path, picture):
    image = tmp_path / "p.png"
    picture.save(image)
    for flags, expect in (
        (["--each", "--prompt-cache", str(tmp_path / "x.kv")], "--prompt-cache with --each: one question a run"),
        (["--prompt-cache", str(tmp_path)], f"--prompt-cache {tmp_path}: is a folder"),
        (["--prompt-cache", str(tmp_path / "no" / "x.kv")], f"no folder {tmp_path / 'no'}"),
    ):
        r = runner.invoke(app, [str(model_path), "--image", str(image), "-p", "Hi", "-n", "2", *flags])
        assert r.exit_code == 2 and r.stderr.startswith("qvl-run: error: ") and expect in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1


def test_a_tampered_file_is_not_used(model_path, picture, tmp_path):
    """A file in the format whose parts are not what they should be: one reason, no traceback."""
    import torch

    path = tmp_path / "t.kv"
    model = load(model_path, device="cpu")
    model.generate("What is this?", [picture], max_new_tokens=2)
    kv_file.save(model, path)
    good = torch.load(path, weights_only=True)
    for change in ({"keys": "abc"}, {"hashes": ["zz" * 16]}, {"layers": [[1]]}, {"layers": good["layers"][:-1]},
                   {"layers": [[t.half() for t in p] for p in good["layers"]]}, {"format": "other/1"}):
        torch.save({**good, **change}, path)
        n, why = kv_file.restore(load(model_path, device="cpu"), path)
        assert n == 0 and why is not None and why.startswith(f"{path}: "), change


def test_the_old_cache_goes_before_the_restored_one_is_made(model_path, picture, tmp_path, monkeypatch):
    """On a GPU both would be there for a moment: the restored cache is allocated after the kept
    one is let go (held elements counted when new_cache is called)."""
    path = tmp_path / "a.kv"
    model = load(model_path, device="cpu")
    model.generate("What is this?", [picture], max_new_tokens=2)
    n = kv_file.save(model, path)
    model.generate("Something else entirely, and longer.", [], max_new_tokens=2)
    held, make = [], model.decoder.new_cache

    def new_cache(*args):
        cache, keys, _ = model.kept_prompt()
        held.append((len(keys), sum(t.numel() for s in cache.k + cache.v for t in kv_file.parts(s))))
        return make(*args)

    monkeypatch.setattr(model.decoder, "new_cache", new_cache)
    assert kv_file.restore(model, path) == (n, None)
    assert held == [(0, 0)] and len(model.kept_prompt()[1]) == n
