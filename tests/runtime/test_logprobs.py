"""Generation.logprobs (logprobs.py): each generated token's log-probability under the raw
logits, as the prompt's logits give it when the answer so far is read as a prompt."""

from __future__ import annotations

import pytest
import torch

from qvl.runtime.loader import load
from qvl.runtime import logprobs
from qvl.runtime.logprobs import prompt_logprobs
from qvl.runtime.model import ModelError


@pytest.fixture(scope="module")
def model(fixtures_dir):
    return load(fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf")


def _prompt_logits(model, ids: list[int]) -> torch.Tensor:
    """Every position's logits for token ids read as a text-only prompt (as prompt_logits does for
    a text, without its tokenization: a sampled answer need not tokenize back to its ids)."""
    embeds = model.decoder.embed_tokens(torch.tensor(ids))
    positions = torch.arange(len(ids)).expand(3, len(ids))
    cache = model.decoder.new_cache(len(ids), model.placement.kv_type)
    with torch.no_grad():
        return model._prefill(embeds, positions, cache, all_logits=True).float()


@pytest.mark.parametrize("kwargs", [dict(), dict(temperature=0.9, seed=4, repeat_penalty=1.3)])
def test_each_tokens_logprob_is_the_models(model, kwargs):
    """Sampled or greedy, penalized or not: the log-softmax of the raw logits at each step (checked
    by reading prompt + answer as one prompt, within 2e-3: the generation's decode steps against
    one prefill in bf16), the top alternatives sorted and holding the greedy choice."""
    prompt = "Count: one two"
    g = model.generate(prompt, template=False, max_new_tokens=6, logprobs=3, cache_prompt=False, **kwargs)
    assert g.logprobs is not None and [t.token for t in g.logprobs] == g.token_ids
    ids = model.tokenize(prompt, [])[0]
    full = torch.log_softmax(_prompt_logits(model, ids + g.token_ids), -1)
    for i, t in enumerate(g.logprobs):
        assert t.logprob == pytest.approx(float(full[len(ids) - 1 + i, t.token]), abs=2e-3)
    for t in g.logprobs:
        values = [v for _, v in t.top]
        assert len(t.top) == 3 and values == sorted(values, reverse=True) and t.logprob <= values[0] + 1e-6
        if not kwargs:
            assert t.top[0][0] == t.token
    assert model.generate(prompt, template=False, max_new_tokens=2).logprobs is None
    with pytest.raises(ModelError, match=f"logprobs {model.cfg.n_vocab + 1}: 0 to {model.cfg.n_vocab}"):
        model.generate(prompt, logprobs=model.cfg.n_vocab + 1)  # (OpenAI's and Ollama's 20: their endpoints')


@pytest.mark.parametrize("rows", [1, 4, 128])
def test_prompt_logprobs(model, monkeypatch, rows):
    """A prompt's tokens scored from its logits made `rows` positions at a time: the same values
    as the whole prompt's logits at once (to 1e-5), whatever the slices (the last one short)."""
    monkeypatch.setattr(logprobs, "LOGIT_ROWS", rows)
    text = "a b c d e f g"
    ids, scores = prompt_logprobs(model, text, 2)
    assert ids == model.tokenize(text, [])[0] and scores[0] is None and len(scores) == len(ids) == 7
    want = torch.log_softmax(model.prompt_logits(text, template=False).float(), -1)
    for i, s in enumerate(scores[1:], 1):
        best = torch.topk(want[i - 1], 2)
        assert s.token == ids[i] and s.logprob == pytest.approx(float(want[i - 1, ids[i]]), abs=1e-5)
        assert [t for t, _ in s.top] == best.indices.tolist()
    assert prompt_logprobs(model, "", 1) == ([], [])


def test_qvl_run_json_logprobs(model, fixtures_dir):
    import json

    from typer.testing import CliRunner

    from qvl.runtime.run_cli import app

    path = fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf"
    r = CliRunner().invoke(app, [str(path), "-p", "Hi", "-n", "4", "--json", "--logprobs", "2"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    want = model.generate("Hi", max_new_tokens=4, logprobs=2)
    assert [t["token"] for t in out["logprobs"]] == out["token_ids"] == want.token_ids
    assert [t["logprob"] for t in out["logprobs"]] == pytest.approx([t.logprob for t in want.logprobs], abs=1e-5)
    assert all(len(t["top"]) == 2 and t["top"][0][0] == t["token"] for t in out["logprobs"])
    for args, line in [(["--logprobs", "2"], "--logprobs: with --json"),
                       (["--json", "--logprobs", "21"], "--logprobs 21: 0 to 20, with --json")]:
        r = CliRunner().invoke(app, [str(path), "-p", "Hi", *args])
        assert r.exit_code == 2 and r.output.strip() == f"qvl-run: error: {line}"
