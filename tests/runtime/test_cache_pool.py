"""Conversations taking turns on one model (runtime/cache_pool.py): the one that comes back goes on
from its own cache, copied aside while the other ran, and answers bit for bit as if nothing had
come between; a chat going on copies nothing; the budget drops the oldest; qvl serve's flag."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qvl.runtime.cache_pool import MIN_LOST, CachePool
from qvl.runtime.loader import load


@pytest.fixture(scope="module")
def model_path(fixtures_dir):
    return fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf"


def _picture(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (280, 420, 3), dtype=np.uint8))  # 150 tokens


A, B = _picture(1), _picture(2)


def _turns(model, picture, first_answer=None):
    """A conversation's first turn, or (with the first answer) its second."""
    messages = [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "What?"}]}]
    if first_answer is not None:
        messages += [{"role": "assistant", "content": first_answer}, {"role": "user", "content": "And then?"}]
    return model.chat(messages, max_new_tokens=4, logprobs=2)


def _scores(g):
    return [(t.token, t.logprob) for t in g.logprobs]


def test_a_conversation_coming_back_goes_on_from_its_own_cache(model_path):
    alone = load(model_path, device="cpu")  # A's two turns with nothing between
    a1 = _turns(alone, A)
    a2_alone = _turns(alone, A, a1.text)
    assert a2_alone.reused_tokens > a1.prompt_tokens

    pooled = load(model_path, device="cpu")
    pooled.cache_pool = CachePool(1 << 30)
    assert _scores(_turns(pooled, A)) == _scores(a1)
    b1 = _turns(pooled, B)  # another conversation: A's cache is copied aside
    assert "vision_ms" in b1.timings and len(pooled.cache_pool.entries) == 1
    a2 = _turns(pooled, A, a1.text)
    assert a2.reused_tokens == a2_alone.reused_tokens and "vision_ms" not in a2.timings
    assert _scores(a2) == _scores(a2_alone)  # the copy is exact: the same answer and log-probabilities
    assert len(pooled.cache_pool.entries) == 1  # B's, set aside in its turn; A's was taken out
    b2 = _turns(pooled, B, b1.text)
    assert "vision_ms" not in b2.timings and b2.reused_tokens > b1.prompt_tokens

    plain = load(model_path, device="cpu")  # without the pool, A's picture is read again
    _turns(plain, A)
    _turns(plain, B)
    again = _turns(plain, A, a1.text)
    assert "vision_ms" in again.timings and again.reused_tokens < a1.prompt_tokens
    assert again.token_ids == a2.token_ids


def test_a_chat_going_on_copies_nothing_and_the_budget_drops_the_oldest(model_path):
    model = load(model_path, device="cpu")
    model.cache_pool = CachePool(1 << 30)
    a1 = _turns(model, A)
    _turns(model, A, a1.text)
    assert model.cache_pool.entries == []  # its own cache went on: nothing cut
    _turns(model, B)
    one = model.cache_pool.nbytes
    assert one > 0 and model.cache_pool.entries[0].keys and len(model.cache_pool.entries[0].keys) >= MIN_LOST
    model.cache_pool.max_bytes = one  # room for one
    _turns(model, _picture(3))  # B's set aside; A's (the oldest) dropped
    assert len(model.cache_pool.entries) == 1 and model.cache_pool.nbytes <= one
    assert "vision_ms" in _turns(model, A, a1.text).timings


def test_qvl_serve_sets_a_pool(fixtures_dir):
    from typer.testing import CliRunner

    from qvl.runtime.cli import app
    from qvl.runtime.server import ServeConfig, Service

    path = str(fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf")
    loaded = Service(ServeConfig(default_model=path, cache_pool_bytes=10 ** 9)).use(path)
    assert isinstance(loaded.model.cache_pool, CachePool) and loaded.model.cache_pool.max_bytes == 10 ** 9
    assert Service(ServeConfig()).config.cache_pool_bytes == 0
    r = CliRunner().invoke(app, ["serve", "--cache-pool", "-1"])
    assert r.exit_code == 2 and "--cache-pool -1.0: 0 (off) or more GB" in r.stderr
