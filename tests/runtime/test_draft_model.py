"""Speculative decoding with a draft model (runtime/draft_model.py, llama.cpp's --spec-type
draft-simple): an answer's tokens are those of decoding one token at a time, whatever the draft
model and the sampler, on float32 tiny models; a draft model that is the target itself (or its
text-only `qwen2` twin) guesses the target's greedy tokens, so every guess is taken: the draft
model read the same prompt, picture and answer at the same positions (a picture through its own
vision tower, or, without one, the target's rows as llama.cpp hands them over). A text-only qwen2
GGUF reads as transformers' Qwen2ForCausalLM does.

Tolerances: logits within 1e-4 of transformers' (float32 on both sides; the sums run in another
order, ~1e-6 apart here); drafts are compared as token ids, exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from serving import MODEL, Running
from typer.testing import CliRunner

from gguf_compare import as_qwen2
from qvl.runtime.chat import render
from qvl.runtime.draft_model import DraftModel, load_draft, vocab_mismatch
from qvl.runtime.loader import load
from qvl.runtime.model import ModelError
from qvl.runtime.run_cli import app
from qvl.runtime.server import ServeConfig, Service
from qvl.runtime.speculative import Drafter, Speculation, SpeculationError, speculation
from tiny_models import TinySpec, make_checkpoint, to_gguf

PROMPT = "one two three four five one two three four five one two three four five"
IMAGE = Image.fromarray(np.random.default_rng(4).integers(0, 256, (84, 112, 3), dtype=np.uint8))
DRAFT = Speculation(n_max=4, types=("draft-simple",))
GREEDY: dict = {}
SEEDED = {"temperature": 0.9, "top_k": 20, "seed": 5}
PENALIZED = {"temperature": 0.7, "min_p": 0.02, "repeat_penalty": 1.3, "repeat_last_n": 16, "seed": 11}
BIASED = {"logit_bias": {t: 8.0 for t in range(300, 306)}, "temperature": 0.8, "seed": 3}  # the draft sees no bias


@dataclass(frozen=True)
class Files:
    target: Path  # with mmproj-m.gguf beside it
    other: Path  # another tiny model (other weights, one layer, 48 wide), same tokenizer
    text: Path  # the target's text model as a text-only qwen2 GGUF
    narrow: Path  # the other model's, text-only: another width than the target's
    ckpt: Path  # the target's checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Files:
    d = tmp_path_factory.mktemp("draft")
    ckpt = make_checkpoint(d / "ckpt", TinySpec(dtype=torch.float32, seed=11))
    target = to_gguf(ckpt, d / "m.gguf", "f32", "f32")
    for sub in ("other", "text", "narrow"):
        (d / sub).mkdir()
    other = to_gguf(make_checkpoint(d / "ckpt2", TinySpec(dtype=torch.float32, seed=12, layers=1, hidden=48)),
                    d / "other" / "o.gguf", "f32", "f32")
    return Files(target, other, as_qwen2(target, d / "text" / "q.gguf"), as_qwen2(other, d / "narrow" / "n.gguf"),
                 ckpt)


@pytest.fixture(scope="module")
def model(tiny):
    return load(tiny.target, dtype=torch.float32)


@pytest.fixture(scope="module")
def drafts(model, tiny) -> dict[str, DraftModel]:
    return {name: load_draft(model, path, "cpu", True)
            for name, path in (("self", tiny.target), ("other", tiny.other), ("text", tiny.text),
                               ("narrow", tiny.narrow))}


def _answer(model, draft: DraftModel | None, spec: Speculation = DRAFT, **kwargs):
    model.speculation, model.drafter = (spec if draft is not None else None), Drafter(draft)
    try:
        return model.generate(PROMPT, **{"max_new_tokens": 40, "cache_prompt": False, **kwargs})
    finally:
        model.speculation, model.drafter = None, Drafter()


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED, PENALIZED, BIASED], ids=["greedy", "seeded", "penalties", "bias"])
@pytest.mark.parametrize("name", ["self", "other", "text"])
def test_same_answer_as_one_token_at_a_time(model, drafts, name, sampling):
    plain, fast = _answer(model, None, **sampling), _answer(model, drafts[name], **sampling)
    assert fast.token_ids == plain.token_ids and fast.text == plain.text and fast.ended == plain.ended
    assert fast.timings["draft_n"] > 0, "no draft was made: the case checks nothing"
    if name != "other" and sampling is GREEDY:  # the target's own greedy guesses: every one taken
        assert fast.timings["draft_n_accepted"] == fast.timings["draft_n"] >= 20


def test_the_draft_model_reads_the_picture(model, drafts, monkeypatch):
    """With a picture, the target itself as draft model (its own vision tower encoding the picture)
    guesses every greedy token; so does the text-only twin, which reads the target's rows for the
    picture (its width is the target's); a text-only draft of another width reads zeros there. The
    answers are the same."""
    plain = _answer(model, None, images=[IMAGE])
    seeing, twin = _answer(model, drafts["self"], images=[IMAGE]), _answer(model, drafts["text"], images=[IMAGE])
    rows: list[torch.Tensor] = []
    narrow = drafts["narrow"]
    real = narrow.model._prefill_hidden
    monkeypatch.setattr(narrow.model, "_prefill_hidden", lambda e, p, c: rows.append(e.clone()) or real(e, p, c))
    narrow._held = []  # the whole prompt read again
    blind = _answer(model, narrow, images=[IMAGE])
    assert drafts["self"].sees and not drafts["text"].sees and not narrow.sees
    assert seeing.token_ids == plain.token_ids == twin.token_ids == blind.token_ids and seeing.prompt_tokens > 20
    for out in (seeing, twin):
        assert out.timings["draft_n_accepted"] == out.timings["draft_n"] >= 20
    ids = model.tokenize(render(model.chat_template, model.messages_for(PROMPT, 1)), [IMAGE])[0]
    pads = [i for i, t in enumerate(ids) if t == model.image_pad_id]
    assert len(rows) == 1 and len(pads) > 4 and rows[0][pads].abs().max() == 0 and rows[0].abs().max() > 0
    assert blind.timings["draft_n"] > 0


def test_the_draft_model_keeps_its_cache(model, tiny, monkeypatch):
    """Asked the same prompt again, the draft model reads none of it again; a chat's next turn not
    the last turn's prompt. Refused guesses leave no trace in its cache (the answers are unchanged)."""
    read: list[int] = []
    draft = load_draft(model, tiny.other, "cpu", True)
    real = draft.model._prefill_hidden

    def recording(embeds, positions, cache):
        read.append(embeds.shape[0])
        return real(embeds, positions, cache)

    monkeypatch.setattr(draft.model, "_prefill_hidden", recording)
    first = _answer(model, draft, **SEEDED)
    n_first = read[-1]
    again = _answer(model, draft, **SEEDED)
    messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": first.text},
                {"role": "user", "content": "again"}]
    model.speculation, model.drafter = DRAFT, Drafter(draft)
    try:
        turn = model.chat(messages, max_new_tokens=24, cache_prompt=False, **SEEDED)
    finally:
        model.speculation, model.drafter = None, Drafter()
    fresh = model.chat(messages, max_new_tokens=24, cache_prompt=False, **SEEDED)
    assert again.token_ids == first.token_ids and turn.token_ids == fresh.token_ids
    assert n_first == first.prompt_tokens and len(read) == 2  # the same prompt again: nothing read
    assert read[-1] <= turn.prompt_tokens - first.prompt_tokens  # the turn: from the first prompt's end at most
    assert first.timings["draft_n_accepted"] < first.timings["draft_n"]  # guesses were refused


def test_p_min_and_n_min(model, drafts, monkeypatch):
    """A guess below p_min ends the draft; a draft shorter than n_min is none (llama.cpp's rules)."""
    sizes: list[int] = []
    real = DraftModel.draft

    def recording(self, answer, most, p_min, n_min):
        out = real(self, answer, most, p_min, n_min)
        sizes.append(len(out))
        return out

    monkeypatch.setattr(DraftModel, "draft", recording)
    everything = _answer(model, drafts["self"])
    assert max(sizes) == 4 and min(sizes) > 0  # no p_min: n_max guesses (fewer only near the answer's end)
    sizes.clear()
    assert "draft_n" not in _answer(model, drafts["self"], Speculation(n_max=4, types=("draft-simple",),
                                                                       draft_p_min=1.0)).timings
    assert set(sizes) == {0}
    sizes.clear()
    # a tiny random model is unsure: its guesses' probabilities among 10 run about 0.12 to 0.24
    some = _answer(model, drafts["self"], Speculation(n_max=4, types=("draft-simple",), draft_p_min=0.18))
    assert 0 in sizes and max(sizes) > 0 and some.token_ids == everything.token_ids
    sizes.clear()
    none = _answer(model, drafts["self"], Speculation(n_max=4, types=("draft-simple",), draft_n_min=5))
    assert "draft_n" not in none.timings and set(sizes) == {0} and none.token_ids == everything.token_ids


def test_a_guess_is_the_argmax_and_its_probability_among_ten(drafts, monkeypatch):
    """draft-simple's guess and p_min test, by hand on fixed logits: the argmax is the guess (the
    first of tied ones), its softmax over the 10 largest logits (not the whole vocabulary) is what
    p_min is held to."""
    logits = torch.full((1, 50), -30.0)
    logits[0, 7], logits[0, 3] = 2.0, 2.0 - np.log(9.0)  # p(7) = 0.9 among these two; the rest ~0
    draft = DraftModel(drafts["self"].model, False)
    monkeypatch.setattr(draft, "_cache", type("C", (), {"length": 0})())
    monkeypatch.setattr(draft.model, "_decode", lambda cache, tokens, position: logits)
    assert draft.draft([1], 3, 0.0, 0) == [7, 7, 7]
    assert draft.draft([1], 3, 0.89, 0) == [7, 7, 7] and draft.draft([1], 3, 0.91, 0) == []
    many = torch.full((1, 50), 0.0)
    many[0, 7] = 1.0  # 11 ties below it: 10 in the top-k, p(7) = e / (e + 9)
    monkeypatch.setattr(draft.model, "_decode", lambda cache, tokens, position: many)
    p = np.e / (np.e + 9)
    assert draft.draft([1], 2, p - 1e-4, 0) == [7, 7] and draft.draft([1], 2, p + 1e-4, 0) == []
    tied = torch.zeros((1, 50))
    tied[0, [31, 9, 40]] = 1.0  # a tie at the top: the first, as the greedy sampler's argmax
    monkeypatch.setattr(draft.model, "_decode", lambda cache, tokens, position: tied)
    assert draft.draft([1], 2, 0.0, 0) == [9, 9]
    # a token the draft's vocabulary lacks (the 7B's 152064 against a 0.5B's 151936: padding ids): no draft
    assert draft.draft([1, draft.model.cfg.n_vocab], 2, 0.0, 0) == []


class _Vocab:
    def __init__(self, tokens: list[str], **kv):
        self.kv = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, **kv}

    def get(self, key, default=None):
        return self.kv.get(key, default)

    def require(self, key):
        return self.kv[key]


def test_vocab_rules():
    """llama.cpp's common_speculative_are_compatible: type, begin/end tokens, sizes within 128,
    the same text from token 5 on (tokens 0-4 may differ)."""
    base = [f"t{i}" for i in range(300)]
    assert vocab_mismatch(_Vocab(base), _Vocab(base[:5][::-1] + base[5:] + ["x"] * 128)) is None
    assert "429 tokens" in vocab_mismatch(_Vocab(base), _Vocab(base + ["x"] * 129))
    assert "token 5 is 'y'" in vocab_mismatch(_Vocab(base), _Vocab(base[:5] + ["y"] + base[6:]))
    assert "tokenizer is 'llama'" in vocab_mismatch(_Vocab(base), _Vocab(base, **{"tokenizer.ggml.model": "llama"}))
    bos = {"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": 1}
    assert vocab_mismatch(_Vocab(base, **bos), _Vocab(base, **bos)) is None
    assert "bos token" in vocab_mismatch(_Vocab(base, **bos), _Vocab(base))
    assert "eos token" in vocab_mismatch(_Vocab(base, **{"tokenizer.ggml.add_eos_token": True}), _Vocab(base))


def test_a_draft_of_another_vocabulary_is_refused(model, fixtures_dir):
    real = fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp"
    path = next(p for p in sorted(real.glob("*.gguf")) if not p.name.startswith("mmproj"))
    with pytest.raises(ModelError, match="cannot draft for .*its vocabulary has 151"):
        load_draft(model, path, "cpu", True)


def test_a_pulled_model_drafts_by_its_name(store, files, monkeypatch):
    """--spec-draft-model NAME: a model in the store (its projector with it), as qvl-run MODEL takes one."""
    monkeypatch.setenv("QVL_MODELS", str(store.root))
    target = load(files / MODEL)
    draft = load_draft(target, "tiny:1", "cpu", False)
    assert draft.sees and draft.model.text_file.path != files / MODEL  # the store's blob, its projector paired
    plain = target.generate(PROMPT, max_new_tokens=16, cache_prompt=False)
    target.drafter, target.speculation = Drafter(draft), DRAFT
    fast = target.generate(PROMPT, max_new_tokens=16, cache_prompt=False)
    assert fast.token_ids == plain.token_ids and fast.timings["draft_n"] > 0
    with pytest.raises(ModelError, match="nothere:1: no such file, nor a pulled model"):
        load_draft(target, "nothere:1", "cpu", False)


def test_qwen2_text_model_reads_as_transformers_qwen2(tiny):
    """The text-only qwen2 GGUF (1D rotary as M-RoPE's first section) against transformers'
    Qwen2ForCausalLM on the same weights: logits within 1e-4, the same greedy tokens."""
    from safetensors.torch import load_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = json.loads((tiny.ckpt / "config.json").read_text())
    ref = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_key_value_heads"], rms_norm_eps=cfg["rms_norm_eps"],
        rope_theta=cfg.get("rope_theta", 1e6), tie_word_embeddings=False, max_position_embeddings=256))
    state = {k: v for k, v in load_file(tiny.ckpt / "model.safetensors").items() if not k.startswith("visual.")}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    ours = load(tiny.text, dtype=torch.float32)
    assert ours.vision is None and ours.cfg.arch == "qwen2" and ours.cfg.mrope_section[1:] == (0, 0)
    ids = ours.tokenizer.encode(PROMPT).ids
    got = ours.prompt_logits(PROMPT, template=False)
    want = ref(torch.tensor([ids])).logits[0].detach()
    assert got.shape == want.shape and torch.allclose(got.float(), want, atol=1e-4, rtol=0)
    out = ours.generate(PROMPT, template=False, max_new_tokens=12, cache_prompt=False)
    greedy = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(ids):].tolist()
    assert out.token_ids == greedy[:len(out.token_ids)] and len(out.token_ids) > 0


def test_flags():
    assert speculation(None, draft_model=True) == Speculation(types=("draft-simple",))
    assert Speculation(types=("draft-simple",)).draft_max(True) == 3  # a guess costs a draft pass: llama.cpp's 3
    assert Speculation(types=("ngram-mod",)).draft_max(True) == 7
    assert speculation("ngram-simple,draft-simple", draft_model=True).types == ("ngram-simple", "draft-simple")
    for bad, says in ((lambda: speculation("draft-simple"), "needs --spec-draft-model"),
                      (lambda: speculation("ngram-mod", draft_model=True), "with --spec-type draft-simple"),
                      (lambda: Speculation(draft_p_min=1.5), "--spec-draft-p-min 1.5"),
                      (lambda: Speculation(draft_n_min=-1), "--spec-draft-n-min -1")):
        with pytest.raises(SpeculationError, match=says):
            bad()


runner = CliRunner()


def test_qvl_run_with_a_draft_model(tiny):
    args = [str(tiny.target), "-p", PROMPT, "-n", "24", "--json", "--f32"]
    plain = runner.invoke(app, args)
    fast = runner.invoke(app, args + ["-md", str(tiny.text), "--spec-draft-n-max", "3"])
    assert plain.exit_code == 0 and fast.exit_code == 0, fast.stderr
    a, b = json.loads(plain.stdout), json.loads(fast.stdout)
    assert b["token_ids"] == a["token_ids"] and b["timings"]["draft_n"] > 0
    told = runner.invoke(app, args + ["-md", str(tiny.narrow), "--verbose"])
    assert told.exit_code == 0 and "layers 1, width 48; pictures: zero rows" in told.stderr, told.stderr
    told = runner.invoke(app, args + ["-md", str(tiny.target), "--verbose"])
    assert "pictures: its own vision tower" in told.stderr
    for flags, says, code in ((["--spec-type", "draft-simple"], "--spec-type draft-simple needs", 2),
                              (["--spec-draft-model", str(tiny.text), "--spec-draft-p-min", "2"],
                               "--spec-draft-p-min 2.0: 0 to 1", 2),
                              (["--model-draft", str(tiny.ckpt / "config.json")], "not a GGUF file", 2),
                              (["-md", str(tiny.ckpt / "none.gguf")], "none.gguf: no such file", 2)):
        r = runner.invoke(app, args + flags)
        assert r.exit_code == code and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_serve_with_a_draft_model(store, tiny):
    """qvl serve's model gets its draft model when loaded: /completion's tokens unchanged, drafts counted."""
    config = ServeConfig(default_model=str(tiny.target), speculation=DRAFT, draft_model=str(tiny.text))
    running = Running(Service(config, store))
    try:
        got = running.json("/completion", {"prompt": PROMPT, "n_predict": 24, "return_tokens": True})
    finally:
        running.server.shutdown()
    plain = load(tiny.target).generate(PROMPT, template=False, max_new_tokens=24)
    assert got["tokens"] == plain.token_ids and got["timings"]["draft_n"] > 0
    assert got["generation_settings"]["speculative.types"] == "draft-simple"

