"""A prompt that runs out of GPU memory (runtime/prefill_oom.py): read again from its start in
passes half as long, with a warning each time, the answer the same as without the failure.
The CPU has no GPU to run out of: the decoder's forward pass is made to fail as a GPU's would
(torch.OutOfMemoryError) on passes of more tokens than a set number.

Tolerance: logits within 1e-5 of the largest (float32; passes of other lengths only change the
order of the products' sums)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qvl.runtime import prefill_oom
from qvl.runtime.decoder import PREFILL_CHUNK, Decoder
from qvl.runtime.loader import load

PAIR = ("tiny-qwen2.5-vl", "llamacpp", "tiny-qwen2.5-vl-f16.gguf")
IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
PROMPT = "Look: {image1} " + "the keeper lit the lamp at dusk for the ships, " * 60 + "what now?"


def _model(fixtures_dir):
    model = load(fixtures_dir.joinpath(*PAIR), device="cpu", dtype=torch.float32)
    warnings: list[str] = []
    model.on_warning = warnings.append
    return model, warnings


def _room(monkeypatch, tokens: int) -> list[tuple[int, bool]]:
    """Passes of more than `tokens` tokens fail as out of GPU memory; (tokens, failed) each pass."""
    forward = Decoder.forward
    calls: list[tuple[int, bool]] = []

    def limited(self, x, positions, cache):
        calls.append((x.shape[0], x.shape[0] > tokens))
        if x.shape[0] > tokens:
            cache.length += 3  # a failed pass may leave anything behind: the retry puts the length back
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return forward(self, x, positions, cache)

    monkeypatch.setattr(Decoder, "forward", limited)
    return calls


def test_a_prompt_out_of_memory_is_read_again_in_shorter_passes(fixtures_dir, monkeypatch):
    ref, _ = _model(fixtures_dir)
    expected_logits = ref.prompt_logits(PROMPT, [IMAGE])
    expected = ref.generate(PROMPT, [IMAGE], max_new_tokens=4)
    n = expected.prompt_tokens
    assert 600 < n < 1024
    model, warnings = _model(fixtures_dir)
    calls = _room(monkeypatch, 200)
    logits = model.prompt_logits(PROMPT, [IMAGE])
    # 512 fails (the prompt's first pass), then 256, then passes of 128 read it
    assert calls[0] == (PREFILL_CHUNK, True) and calls[1] == (256, True)
    assert [c for c, _ in calls[2:]] == [128] * (n // 128) + [n % 128] and not any(f for _, f in calls[2:])
    assert warnings == ["out of GPU memory reading the prompt; reading it again with passes of 256 tokens",
                        "out of GPU memory reading the prompt; reading it again with passes of 128 tokens"]
    assert logits.shape == expected_logits.shape
    assert (logits - expected_logits).abs().max() <= 1e-5 * expected_logits.abs().max()
    calls.clear()
    out = model.generate(PROMPT, [IMAGE], max_new_tokens=4)  # the shorter passes are kept: no failure now
    assert out.token_ids == expected.token_ids and len(warnings) == 2
    assert calls[0] == (128, False) and model.decoder.pass_share == 4


def test_out_of_memory_in_the_shortest_passes_is_raised(fixtures_dir, monkeypatch):
    model, warnings = _model(fixtures_dir)
    _room(monkeypatch, prefill_oom.MIN_PASS - 1)
    with pytest.raises(torch.OutOfMemoryError, match="out of GPU memory reading the prompt, in passes of 32 tokens"):
        model.generate(PROMPT, [IMAGE], max_new_tokens=4)
    assert [w.rsplit(" ", 2)[-2] for w in warnings] == ["256", "128", "64", "32"]
