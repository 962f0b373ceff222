"""Prompt reuse between generations (runtime/prompt_cache.py): what is reused, and that a
generation on a reused cache gives the logits and tokens of one that reads its whole prompt.

Tolerance for logits, reused against fresh (both float32): 1e-4 x max |logit|. The two differ only
in how the prompt is cut into prefill passes (matmuls of other shapes sum in another order).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import qvl.runtime.model as model_module
from qvl.runtime.chat import render
from qvl.runtime.model import ModelError
from qvl.runtime.loader import load
from qvl.runtime.prompt_cache import MediaSpan, PromptKeys
from qvl.runtime.vision_cache import VisionCache
from tiny_models import TinySpec, make_checkpoint, to_gguf

rng = np.random.default_rng(1)
IMG = Image.fromarray(rng.integers(0, 256, (120, 170, 3), dtype=np.uint8))
SAME_SIZE = Image.fromarray(rng.integers(0, 256, (120, 170, 3), dtype=np.uint8))
TOKENS = 16
REL = 1e-4


def span(start, length, value=0.0, video=False):
    return MediaSpan(start, length, video, np.full((4, 8), value, np.float32), (1, 2, 2))


def test_keys_name_pictures_by_their_pixels():
    keys = PromptKeys()
    a = keys.keys([5, 6, 9, 9, 7], [span(2, 2, 1.0)])
    b = keys.keys([5, 6, 9, 9, 7], [span(2, 2, 2.0)])  # same size, other pixels
    c = keys.keys([5, 6, 9, 9, 7], [span(2, 2, 1.0)])
    assert a[:2] == [5, 6] and a[4] == 7 and min(a[2:4]) < 0 and a[2] != a[3]
    assert a == c and a[2:4] != b[2:4]
    assert keys.keys([9, 9], [span(0, 2, 1.0, video=True)]) != keys.keys([9, 9], [span(0, 2, 1.0)])


def test_reuse_stops_before_the_last_token_and_outside_pictures():
    keys = PromptKeys()
    media = [span(2, 3, 1.0)]
    prompt = keys.keys([1, 2, 0, 0, 0, 3, 4], media)
    keys.kept = prompt + [8, 9]
    assert keys.reusable(prompt, media) == 6  # all but the last prompt token
    assert keys.reusable(prompt[:5] + [5, 6], media) == 5
    other = keys.keys([1, 2, 0, 0, 0, 3, 4], [span(2, 3, 2.0)])
    assert keys.reusable(other, [span(2, 3, 2.0)]) == 2  # the other picture is read again whole
    keys.kept = prompt[:4]  # a cache that ends inside the picture
    assert keys.reusable(prompt, media) == 2
    keys.kept = []
    assert keys.reusable(prompt, media) == 0


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    d = tmp_path_factory.mktemp("reuse")
    src = make_checkpoint(d / "ckpt", TinySpec(dtype=torch.float32, vision_depth=4, seed=7))
    return to_gguf(src, d / "m.gguf", "f32", "f32")


def _run(model, monkeypatch, messages):
    """(generation, logits the sampler saw) of a greedy chat turn."""
    seen = []

    def recording(logits, history, params, gen):
        seen.append(logits.clone())
        return real(logits, history, params, gen)

    real = model_module.sample
    monkeypatch.setattr(model_module, "sample", recording)
    try:
        out = model.chat(messages, max_new_tokens=TOKENS)
    finally:
        monkeypatch.setattr(model_module, "sample", real)
    return out, torch.stack(seen)


def _same(reused, fresh):
    (a, la), (b, lb) = reused, fresh
    assert a.token_ids == b.token_ids
    assert (la - lb).abs().max() <= REL * lb.abs().max()


def _user(text, *images):
    return {"role": "user", "content": [{"type": "image", "image": im} for im in images] + [
        {"type": "text", "text": text}]}


def test_a_chat_turn_reads_only_what_the_conversation_added(path, monkeypatch):
    model = load(path)
    turn1 = [_user("What is in this picture?", IMG)]
    first, _ = _run(model, monkeypatch, turn1)
    assert first.reused_tokens == 0 and "vision_ms" in first.timings
    assert len(set(first.token_ids)) > 3  # a varied answer, so that a wrong cache would show
    turn2 = turn1 + [{"role": "assistant", "content": first.text}, _user("And the colours?")]
    second = _run(model, monkeypatch, turn2)
    assert "vision_ms" not in second[0].timings  # the picture was not read again
    assert second[0].reused_tokens >= first.prompt_tokens  # the first prompt and (most of) the answer
    _same(second, _run(load(path), monkeypatch, turn2))


def _ids(model, messages):
    images = [c["image"] for m in messages for c in m["content"] if c.get("type") == "image"]
    return model.tokenize(render(model.chat_template, messages), images)[0]


@pytest.mark.parametrize("change", ["same prompt", "other question", "other picture of the same size"])
def test_reused_generation_equals_a_fresh_one(path, monkeypatch, change):
    model = load(path)
    before = [_user("Describe it.", IMG)]
    _run(model, monkeypatch, before)
    after = {"same prompt": before, "other question": [_user("Colours?", IMG)],
             "other picture of the same size": [_user("Describe it.", SAME_SIZE)]}[change]
    reused = _run(model, monkeypatch, after)
    old, new = _ids(model, before), _ids(model, after)
    if change == "same prompt":
        want = len(new) - 1
    elif change == "other question":  # up to where the texts part, the picture included
        want = next(i for i, (a, b) in enumerate(zip(old, new)) if a != b)
        assert want > new.index(model.image_pad_id)
    else:  # the ids agree through the picture's pads: reuse stops where the picture starts
        want = new.index(model.image_pad_id)
    assert reused[0].reused_tokens == want
    assert ("vision_ms" in reused[0].timings) == (change == "other picture of the same size")
    _same(reused, _run(load(path), monkeypatch, after))


def test_cache_prompt_false_reads_everything(path):
    model = load(path)
    model.generate("Describe it.", [IMG], max_new_tokens=2)
    again = model.generate("Describe it.", [IMG], max_new_tokens=2, cache_prompt=False)
    assert again.reused_tokens == 0 and "vision_ms" in again.timings


def test_a_stopped_stream_leaves_a_cache_the_next_turn_can_use(path, monkeypatch):
    model = load(path)
    messages = [_user("Tell me a story.")]
    stream = model.chat(messages, stream=True, max_new_tokens=TOKENS)
    next(stream), next(stream)
    stream.close()  # as Ctrl-C in the chat does
    _same(_run(model, monkeypatch, messages), _run(load(path), monkeypatch, messages))


def test_a_stale_stream_stops_when_another_generation_starts(path):
    model = load(path)
    stream = model.generate("Tell me a story.", stream=True, max_new_tokens=TOKENS)
    next(stream)
    model.generate("Something else.", max_new_tokens=2)
    with pytest.raises(ModelError, match="another generation started"):
        list(stream)


def _caches_held_while_encoding(model, monkeypatch) -> list[int]:
    """Records, at each vision tower run, the capacity of the KV cache the model holds (0: none)."""
    held = []
    real = model.vision.forward

    def forward(pixels, grids):
        kept = model._graph.cache if model._graph is not None else model._kept
        held.append(kept.capacity if kept is not None else 0)
        return real(pixels, grids)

    monkeypatch.setattr(model.vision, "forward", forward)
    return held


@pytest.mark.parametrize("planned_alone", [False, True])
def test_the_vision_tower_runs_before_a_new_cache_is_made(path, monkeypatch, planned_alone):
    """Media are encoded before the generation's cache is made, and a kept cache too small for
    the generation is let go (its reused tokens staged through host memory) before they are, so
    that the two never take accelerator memory at once, as placement.py's plan counts them. A
    kept cache large enough stays, unless a --max-vram plan counted the vision tower alone
    (forced here: the CPU has no plan). The answers equal fresh generations'."""
    model = load(path)
    model.vision_cache = VisionCache(budget=0)  # the picture read again is encoded again: what this watches
    monkeypatch.setattr(model, "_vision_planned_alone", lambda: planned_alone)
    held = _caches_held_while_encoding(model, monkeypatch)
    before = [_user("Describe it.", IMG)]
    first = model.chat(before, max_new_tokens=4)
    other = [_user("Describe it.", SAME_SIZE)]  # reused up to the picture, which is read again
    grown = _run(model, monkeypatch, other)  # needs TOKENS new tokens: more than the kept cache holds
    assert grown[0].reused_tokens > 0 and "vision_ms" in grown[0].timings
    _same(grown, _run(load(path), monkeypatch, other))
    capacity = first.prompt_tokens + TOKENS  # the cache the second generation made
    again = _run(model, monkeypatch, before)  # fits the kept cache
    assert again[0].reused_tokens > 0
    _same(again, _run(load(path), monkeypatch, before))
    assert held == [0, 0, 0 if planned_alone else capacity]
