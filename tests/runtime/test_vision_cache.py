"""The vision tower's features kept for pictures seen lately (vision_cache.py): a picture asked
about again where the KV cache cannot serve is not encoded again, and the answer is the one an
empty cache gives; the budget drops the least recently used."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qvl.runtime.loader import load
from qvl.runtime.vision_cache import VisionCache


@pytest.fixture(scope="module")
def model(fixtures_dir):
    return load(fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf")


def _picture(seed: int, size=(84, 56)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


def _counted(model, monkeypatch):
    seen = []
    real = model.vision.forward

    def forward(pixels, grids):
        seen.append(list(grids))
        return real(pixels, grids)

    monkeypatch.setattr(model.vision, "forward", forward)
    return seen


def test_a_picture_seen_before_is_not_encoded_again(model, monkeypatch):
    seen = _counted(model, monkeypatch)
    model.vision_cache.clear()
    a, b = _picture(1), _picture(2)
    first = model.generate("Describe it.", [a], max_new_tokens=4, cache_prompt=False)
    assert len(seen) == 1 and first.timings["vision_ms"] > 0
    # other text before the picture: the KV cache cannot serve, the features can
    again = model.generate("Describe it.", [a], max_new_tokens=4, system="Be brief.", cache_prompt=False)
    assert len(seen) == 1 and model.vision_cache.hits >= 1
    model.vision_cache.clear()
    fresh = model.generate("Describe it.", [a], max_new_tokens=4, system="Be brief.", cache_prompt=False)
    assert len(seen) == 2 and fresh.token_ids == again.token_ids
    # two pictures, one held: only the other is encoded, and the answer is an empty cache's
    both = model.generate("Compare them.", [a, b], max_new_tokens=4, cache_prompt=False)
    assert seen[-1] == [(1, 4, 6)] and len(seen) == 3  # b alone (84 x 56: a 4 x 6 patch grid)
    logits = model.prompt_logits("Compare them.", [a, b])
    model.vision_cache.clear()
    assert model.generate("Compare them.", [a, b], max_new_tokens=4, cache_prompt=False).token_ids == both.token_ids
    assert seen[-1] == [(1, 4, 6), (1, 4, 6)]
    model.vision_cache.clear()
    torch.testing.assert_close(model.prompt_logits("Compare them.", [a, b]), logits, rtol=0, atol=1e-5)


def test_the_budget_drops_the_least_recently_used():
    cache = VisionCache(budget=3 * 400)  # three 10 x 10 float32 feature blocks
    for k in (b"a", b"b", b"c"):
        cache.put(k, torch.ones(10, 10))
    assert cache.get(b"a") is not None  # a used: b is now the oldest
    cache.put(b"d", torch.ones(10, 10))
    assert cache.get(b"b") is None and all(cache.get(k) is not None for k in (b"a", b"c", b"d"))
    assert cache.size == 1200
    cache.put(b"big", torch.ones(40, 10))  # over the whole budget: not kept, nothing dropped
    assert cache.get(b"big") is None and cache.size == 1200
    kept = torch.ones(10, 10)
    cache.put(b"e", kept)
    kept += 1  # a copy is kept, not the caller's tensor
    assert torch.equal(cache.get(b"e"), torch.ones(10, 10))
