"""Self-speculative decoding (runtime/speculative.py, llama.cpp's --spec-type ngram-simple): its
drafts are llama.cpp's own function's, and an answer's tokens are those of decoding one token at a
time, whatever the sampler, grammar, logprobs, context or token limit, on a float32 tiny model.
A tiny random model seldom repeats itself, so its answers are held to six tokens (a logit bias of
8 on them: drafts are made, and taken or refused) and some of them cycle (greedy with a repeat
penalty over the last 4: a period of about 6, which drafts longer than one token follow).

Tolerance: logprobs within 1e-4 of one-at-a-time decoding's. A pass over several tokens sums
the attention and the matmuls in another order than a pass over one (float32: ~1e-6 apart here).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from serving import MODEL, Running
from typer.testing import CliRunner

import qvl.runtime.model as model_module
from qvl.runtime.loader import load
from qvl.runtime.run_cli import app
from qvl.runtime.server import ServeConfig, Service
from qvl.runtime.speculative import Drafter, Speculation, SpeculationError, ngram_simple_draft, speculation
from tiny_models import TinySpec, make_checkpoint, to_gguf

VECTORS = Path(__file__).with_name("llamacpp-ngram-drafts.npz")
IMAGE = Image.fromarray(np.random.default_rng(3).integers(0, 256, (56, 84, 3), dtype=np.uint8))  # its pads: no text
PROMPT = "one two three four five one two three four five one two three four five"
BIAS = {t: 8.0 for t in range(300, 306)}
GREEDY: dict = {}
CYCLING = {"repeat_penalty": 1.5, "repeat_last_n": 4}
SEEDED = {"temperature": 0.9, "top_k": 20, "seed": 5}
PENALIZED = {"temperature": 0.7, "min_p": 0.02, "repeat_penalty": 1.3, "repeat_last_n": 16, "seed": 11}
N1_M4, N2_M8, N1_M48 = Speculation(1, 4), Speculation(2, 8, n_max=5), Speculation(1, 48, n_max=40)
MOD = Speculation(n_max=4, types=("ngram-mod",), mod_n_match=2, mod_n_min=1)  # ngram_mod.py
BOTH = Speculation(2, 8, n_max=5, types=("ngram-simple", "ngram-mod"), mod_n_match=3, mod_n_min=0)
MAP_K = Speculation(n_max=4, types=("ngram-map-k",), map_k=(1, 6, 1))  # ngram_map.py
MAP_K4V = Speculation(n_max=4, types=("ngram-map-k4v",), map_k4v=(2, 4, 1))


def test_drafts_are_llamacpps():
    """Every case of scripts/build_ngram_drafts.py: the draft llama.cpp's common_ngram_simple_draft
    made of the history, sampled token, size_n and size_m (none, too, where it made none)."""
    v = np.load(VECTORS)
    made = 0
    for i, (n, m) in enumerate(v["sizes"]):
        history = v["histories"][v["history_at"][i]:v["history_at"][i + 1]]
        want = v["drafts"][v["draft_at"][i]:v["draft_at"][i + 1]].tolist()
        assert ngram_simple_draft(history, int(v["sampled"][i]), int(n), int(m)) == want, (i, n, m)
        made += bool(want)
    assert made > 100 and len(v["sizes"]) - made > 100  # both kinds well represented


def test_a_repeated_phrase_is_drafted_from_its_last_occurrence():
    """[a b c d e] twice then a b: with sampled c and size_n 3 the pattern is (a, b, c); its last
    occurrence starts at 6, so what followed it there (d e a b, at most size_m = 4) is the draft.
    A draft shorter than size_n is none, also where size_m cut it (llama.cpp's rule)."""
    h = np.array([9, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2])
    assert ngram_simple_draft(h, 3, 3, 4) == [4, 5, 1, 2]
    assert ngram_simple_draft(h, 3, 2, 4) == [4, 5, 1, 2] and ngram_simple_draft(h, 3, 3, 2) == []
    assert ngram_simple_draft(h, 7, 3, 4) == []  # (1, 2, 7) never occurred
    assert ngram_simple_draft(h, 3, 3, 9) == []  # 13 tokens: too short to search for 3 + 9 + 1


def test_settings_and_flags():
    assert speculation(None) is None and speculation("none") is None
    assert speculation("ngram-simple", 3, 7, 2) == Speculation(3, 7, 2)
    assert speculation("none,ngram-simple") == Speculation()
    assert Speculation().draft_max(False) == 3 and Speculation().draft_max(True) == 7
    from qvl.kernels.qmatmul import GEMV_MAX_M

    assert Speculation().draft_max(True) + 1 == GEMV_MAX_M  # a GPU pass keeps to the decode GEMV
    assert Speculation(n_max=0).draft_max(False) == 0
    for bad in (lambda: speculation("draft"), lambda: Speculation(0), lambda: Speculation(12, 1025),
                lambda: Speculation(n_max=-1)):
        with pytest.raises(SpeculationError):
            bad()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec")
    src = make_checkpoint(d / "ckpt", TinySpec(dtype=torch.float32, seed=11))
    return load(to_gguf(src, d / "m.gguf", "f32", "f32"), dtype=torch.float32)


def _answer(model, spec, **kwargs):
    model.speculation = spec
    try:
        return model.generate(PROMPT, **{"max_new_tokens": 48, "cache_prompt": False, "logit_bias": BIAS, **kwargs})
    finally:
        model.speculation = None


@pytest.mark.parametrize("sampling,spec", [
    (GREEDY, N1_M4), (GREEDY, N1_M48), (CYCLING, N1_M4), (CYCLING, N2_M8), (SEEDED, N1_M4), (SEEDED, N2_M8),
    (SEEDED, N1_M48), (PENALIZED, N1_M4), (PENALIZED, N2_M8), (PENALIZED, N1_M48), (GREEDY, MOD), (SEEDED, MOD),
    (CYCLING, BOTH), (PENALIZED, BOTH), (SEEDED, MAP_K), (CYCLING, MAP_K), (GREEDY, MAP_K4V), (PENALIZED, MAP_K4V)],
    ids=["greedy-n1-m4", "greedy-n1-m48-max40", "cycling-n1-m4", "cycling-n2-m8-max5", "seeded-n1-m4",
         "seeded-n2-m8-max5", "seeded-n1-m48-max40", "penalties-n1-m4", "penalties-n2-m8-max5",
         "penalties-n1-m48-max40", "greedy-mod", "seeded-mod", "cycling-simple-and-mod", "penalties-simple-and-mod",
         "seeded-map-k", "cycling-map-k", "greedy-map-k4v", "penalties-map-k4v"])
def test_same_answer_as_one_token_at_a_time(model, sampling, spec):
    model.drafter = Drafter()  # ngram-mod's table from this answer's text alone
    plain, fast = _answer(model, None, **sampling), _answer(model, spec, **sampling)
    assert fast.token_ids == plain.token_ids and fast.text == plain.text and fast.ended == plain.ended
    assert fast.timings["draft_n"] > 0, "no draft was made: the case checks nothing"


def test_drafts_are_taken_and_refused(model):
    """Both ways out of a draft happen: tokens taken from it, and a token that leaves it."""
    for sampling in (CYCLING, SEEDED):
        out = _answer(model, Speculation(1, 8, n_max=8), **sampling)
        assert 0 < out.timings["draft_n_accepted"] < out.timings["draft_n"]


def test_ngram_mod_drafts_from_an_earlier_answer(model):
    """The model's drafter keeps ngram-mod's table: asked again, the answer drafts from the last
    one's text (which its own prompt does not hold), its tokens unchanged."""
    spec = Speculation(n_max=4, types=("ngram-mod",), mod_n_match=3, mod_n_min=1)
    model.drafter = Drafter()
    plain = _answer(model, None, **SEEDED)
    first, again = _answer(model, spec, **SEEDED), _answer(model, spec, **SEEDED)
    assert first.token_ids == plain.token_ids == again.token_ids
    assert again.timings["draft_n_accepted"] > first.timings.get("draft_n_accepted", 0) + 5


@pytest.mark.parametrize("kwargs", [{"format": "json"}, {"logprobs": 3}, {"max_new_tokens": 7},
                                    {"max_new_tokens": 200, "ctx_size": 80}, {"stop": ["elnd"]},
                                    {"images": [IMAGE]}],
                         ids=["json", "logprobs", "limit", "context", "stop", "image"])
def test_same_answer_with_a_format_logprobs_and_limits(model, kwargs):
    spec = Speculation(1, 8, n_max=8)
    plain, fast = _answer(model, None, **SEEDED, **kwargs), _answer(model, spec, **SEEDED, **kwargs)
    assert fast.token_ids == plain.token_ids and fast.text == plain.text and fast.ended == plain.ended
    assert fast.timings["draft_n"] > 0
    if "stop" in kwargs:
        assert plain.ended and len(plain.token_ids) < 48  # the stop string was met
    if "ctx_size" in kwargs:
        assert plain.prompt_tokens + len(plain.token_ids) == 81  # the context ended it (the last token is not fed)
    if "logprobs" in kwargs:
        assert fast.logprobs is not None and plain.logprobs is not None
        for a, b in zip(fast.logprobs, plain.logprobs):
            assert a.token == b.token and abs(a.logprob - b.logprob) < 1e-4
            assert [i for i, _ in a.top] == [i for i, _ in b.top]


def test_a_pass_reads_at_most_the_cap_and_what_can_still_be_used(model, monkeypatch):
    sizes = []
    real = model_module.Model._decode

    def recording(self, cache, tokens, position):
        sizes.append(len(tokens))
        return real(self, cache, tokens, position)

    monkeypatch.setattr(model_module.Model, "_decode", recording)
    _answer(model, Speculation(1, 48, n_max=2), max_new_tokens=30, **CYCLING)
    assert max(sizes) == 3
    sizes.clear()
    out = _answer(model, Speculation(1, 48, n_max=40), max_new_tokens=12, **CYCLING)
    # token i's pass drafts at most 12 - i - 2 tokens: the last token's logits are never needed
    assert len(out.token_ids) == 12 and max(sizes) > 3
    assert all(size <= 12 - i - 1 for i, size in enumerate(sizes))


def test_the_cache_keeps_only_the_answer(model):
    """A draft's refused tokens leave no trace: the next turn, reusing the cache, answers as a
    fresh model reading its whole prompt does."""
    first = _answer(model, Speculation(1, 8, n_max=8), **SEEDED, cache_prompt=True)
    messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": first.text},
                {"role": "user", "content": "again"}]
    model.speculation = Speculation(1, 8, n_max=8)
    try:
        reused = model.chat(messages, max_new_tokens=24, **SEEDED)
    finally:
        model.speculation = None
    fresh = model.chat(messages, max_new_tokens=24, cache_prompt=False, **SEEDED)
    assert reused.reused_tokens > 0 and reused.token_ids == fresh.token_ids


runner = CliRunner()


def test_qvl_run_flags(fixtures_dir):
    path = str(fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / MODEL)
    args = [path, "-p", PROMPT, "-n", "24", "--json", "--f32"]
    plain = runner.invoke(app, args)
    fast = runner.invoke(app, args + ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "1",
                                      "--spec-draft-n-max", "4"])
    assert plain.exit_code == 0 and fast.exit_code == 0, fast.stderr
    a, b = json.loads(plain.stdout), json.loads(fast.stdout)
    assert b["token_ids"] == a["token_ids"] and b["timings"]["draft_n"] > 0 and "draft_n" not in a["timings"]
    mod = runner.invoke(app, args + ["--spec-type", "ngram-mod", "--spec-ngram-mod-n-match", "1",
                                     "--spec-ngram-mod-n-min", "0", "--spec-ngram-mod-n-max", "3"])
    assert mod.exit_code == 0 and json.loads(mod.stdout)["token_ids"] == a["token_ids"], mod.stderr
    maps = runner.invoke(app, args + ["--spec-type", "ngram-map-k,ngram-map-k4v", "--spec-ngram-map-k-size-n", "1",
                                      "--spec-ngram-map-k4v-size-n", "2", "--spec-ngram-map-k4v-min-hits", "2"])
    assert maps.exit_code == 0 and json.loads(maps.stdout)["token_ids"] == a["token_ids"], maps.stderr
    for flags, says in ((["--spec-type", "eagle3"], "--spec-type eagle3: none, ngram-simple, ngram-map-k"),
                        (["--spec-type", "ngram-mod", "--spec-ngram-mod-n-match", "0"],
                         "--spec-ngram-mod-n-match 0: 1 to 1024"),
                        (["--spec-type", "ngram-map-k", "--spec-ngram-map-k-min-hits", "0"],
                         "--spec-ngram-map-k-min-hits 0: 1 to 65535"),
                        (["--spec-type", "ngram-simple", "--spec-ngram-simple-size-m", "0"],
                         "--spec-ngram-simple-size-m 0: 1 to 1024"),
                        (["--spec-type", "ngram-simple", "--spec-draft-n-max", "-2"], "--spec-draft-n-max -2")):
        r = runner.invoke(app, args + flags)
        assert r.exit_code == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_serve_drafts_and_reports_them(store, files):
    """/completion's timings carry the draft counts, /metrics llama-server's speculative counters;
    a token taken from a draft is no decoder pass of its own."""
    config = ServeConfig(default_model=str(files / MODEL), speculation=Speculation(1, 8), metrics=True)
    running = Running(Service(config, store))
    try:
        got = running.json("/completion", {"model": "tiny:1", "prompt": PROMPT, "n_predict": 24,
                                           "return_tokens": True})
        status, data = running.request("/metrics")
        props = running.json("/props")
        slots = running.json("/slots")
    finally:
        running.server.shutdown()
    plain = load(files / MODEL).generate(PROMPT, template=False, max_new_tokens=24)
    assert got["tokens"] == plain.token_ids
    t = got["timings"]
    assert t["draft_n"] >= t["draft_n_accepted"] > 0
    assert got["generation_settings"]["speculative.types"] == "ngram-simple"
    assert props["default_generation_settings"]["params"]["speculative.types"] == "ngram-simple"
    assert slots[0]["speculative"] is True
    assert status == 200
    metrics = {line.split(" ")[0].removeprefix("llamacpp:"): float(line.split(" ")[1])
               for line in data.decode().splitlines() if not line.startswith("#")}
    assert metrics["spec_decode_num_draft_tokens_total"] == t["draft_n"]
    assert metrics["spec_decode_num_accepted_tokens_total"] == t["draft_n_accepted"]
    assert 0 < metrics["spec_decode_num_drafts_total"] <= t["draft_n"]
    assert metrics["n_decode_total"] == 1 + 24 - t["draft_n_accepted"]  # a prompt pass, a step a token not taken
    # llama-server's labelled counter: drafts whose token at each place (of at most 3, the CPU's cap) was taken
    at = [metrics[f'spec_decode_num_accepted_tokens_per_pos_total{{position="{i}"}}'] for i in range(3)]
    assert sum(at) == t["draft_n_accepted"] and at == sorted(at, reverse=True)
    assert at[0] <= metrics["spec_decode_num_drafts_total"] and 'position="3"' not in data.decode()


def test_serve_ngram_mod_table_serves_every_request(store, files):
    """qvl serve's model keeps ngram-mod's table between requests, as llama-server's: asked again,
    the answer is drafted from the first one's text (llama.cpp's defaults, n-grams of 24 tokens)."""
    config = ServeConfig(default_model=str(files / MODEL), speculation=Speculation(n_max=4, types=("ngram-mod",)))
    running = Running(Service(config, store))
    try:
        body = {"model": "tiny:1", "prompt": PROMPT, "n_predict": 48, "return_tokens": True, "cache_prompt": False}
        first, again = running.json("/completion", body), running.json("/completion", body)
    finally:
        running.server.shutdown()
    plain = load(files / MODEL).generate(PROMPT, template=False, max_new_tokens=48)
    assert first["tokens"] == plain.token_ids == again["tokens"]
    assert again["generation_settings"]["speculative.types"] == "ngram-mod"
    assert again["timings"]["draft_n_accepted"] >= 8 > first["timings"].get("draft_n_accepted", 0)
