"""The sampler chain (runtime/sampler_chain.py) against llama.cpp's own samplers: for each case of
llamacpp-sampler-vectors.npz (scripts/build_sampler_vectors.py: libllama's typical, top-n-sigma,
XTC, dynamic temperature, top-k, top-p, min-p, temperature and penalties, through ctypes, alone
and in chains of several orders) qvl keeps the same tokens with the same probabilities; DRY
(runtime/dry.py) takes what libllama's takes after the same histories of the fixture's
tokenizer, with its sequence breakers found in the same vocabulary; mirostat 1 and 2 keep what
libllama's keep at each step of a run; the order's names and characters as llama.cpp reads them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from qvl.runtime.dry import breakers, dry_penalties
from qvl.runtime.gguf_file import GGUFFile
from qvl.runtime.sampler_chain import (ORDER, ORDER_LLAMACPP, ChainOptions, Kept, SamplingError, mirostat_kept,
                                       mirostat_mu, parse_order)
from qvl.runtime.sampling import SamplingParams, candidates, sample

VECTORS = np.load(Path(__file__).with_name("llamacpp-sampler-vectors.npz"))
CASES = json.loads(str(VECTORS["cases"]))
DRY = json.loads(str(VECTORS["dry"]))
MIROSTAT = json.loads(str(VECTORS["mirostat"]))
ADAPTIVE = json.loads(str(VECTORS["adaptive"]))


def _params(steps: list[dict]) -> SamplingParams:
    """SamplingParams whose chain is the case's steps in their order (temperature 1 where the
    chain has none: a draw, not greedy)."""
    values: dict = {"temperature": 1.0}
    chain: dict = {}
    for step in steps:
        for key, value in step.items():
            if key in ("typical_p", "top_n_sigma", "xtc_probability", "xtc_threshold", "dynatemp_range",
                       "dynatemp_exponent"):
                chain[key] = value
            elif key != "sampler":
                values[key] = value
    return SamplingParams(**values, chain=ChainOptions(tuple(s["sampler"] for s in steps), **chain))


def _case_id(i: int) -> str:
    c = CASES[i]
    return f"{i}-{c['logits']}-{c['n']}-" + "+".join(s["sampler"] for s in c["steps"])


@pytest.mark.parametrize("i", range(len(CASES)), ids=_case_id)
def test_the_chain_keeps_what_llama_cpps_samplers_keep(i):
    case = CASES[i]
    logits = torch.from_numpy(VECTORS[f"{i}.logits"])
    history = VECTORS[f"{i}.history"].tolist()
    want_ids = VECTORS[f"{i}.ids"]
    left = torch.from_numpy(VECTORS[f"{i}.left"]).double()
    want = dict(zip(want_ids.tolist(), torch.softmax(left, 0).tolist()))
    ids, probs = candidates(logits, history, _params(case["steps"]), torch.Generator().manual_seed(0))
    ids = torch.arange(len(logits)) if ids is None else ids
    got = {t: p for t, p in zip(ids.tolist(), probs.double().tolist()) if p > 0}
    want = {t: p for t, p in want.items() if p > 0}  # a -inf token llama.cpp keeps has no probability
    assert not set(got) - set(want), (sorted(set(got) - set(want))[:10], len(got), len(want))
    # a token kept with a probability float32 cannot hold (a low dynamic temperature: e^-100 and less)
    assert all(want[t] < 1e-37 for t in set(want) - set(got)), sorted(set(want) - set(got))[:10]
    # float32 softmax against llama.cpp's logits through float64 here; dynamic temperature's
    # entropy in float32 in both, summed in another order: 1e-5 relative
    for t in got:
        assert got[t] == pytest.approx(want[t], rel=1e-5, abs=1e-9), t


@pytest.fixture(scope="module")
def tokenizer(fixtures_dir):
    from qvl.runtime.tokenizer import tokenizer_from_gguf

    return tokenizer_from_gguf(GGUFFile(fixtures_dir / "tiny-qwen2.5-vl" / "llamacpp" / "tiny-qwen2.5-vl-f16.gguf"))


@pytest.mark.parametrize("i", range(len(DRY)), ids=lambda i: f"{i}-{DRY[i]['text']}")
def test_dry_takes_what_llama_cpps_takes(i, tokenizer):
    case = DRY[i]
    o = case["dry"]
    cut = dry_penalties(case["history"], o["dry_multiplier"], o["dry_base"], o["dry_allowed_length"],
                        o["dry_penalty_last_n"], breakers(tokenizer, tuple(o["dry_sequence_breakers"])))
    want = dict(zip(VECTORS[f"dry{i}.ids"].tolist(), VECTORS[f"dry{i}.cut"].tolist()))
    assert sorted(cut) == sorted(want)
    for token, value in want.items():  # float32 there: multiplier x base^n rounded once
        assert cut[token] == pytest.approx(value, rel=1e-6), token


def test_the_dry_vectors_penalize_and_break():
    """The DRY cases are not all empty, and the breakers change what is taken (the oracle is
    not trivially matched)."""
    by_breakers: dict[tuple, dict[str, int]] = {}
    for i, case in enumerate(DRY):
        key = (case["text"], json.dumps({k: v for k, v in case["dry"].items() if k != "dry_sequence_breakers"}))
        by_breakers.setdefault(key, {})[json.dumps(case["dry"]["dry_sequence_breakers"])] = len(VECTORS[f"dry{i}.ids"])
    assert sum(len(VECTORS[f"dry{i}.ids"]) > 0 for i in range(len(DRY))) > len(DRY) // 2
    assert sum(len(set(counts.values())) > 1 for counts in by_breakers.values()) >= 5


@pytest.mark.parametrize("i", range(len(MIROSTAT)), ids=lambda i: "v{mirostat}-tau{mirostat_tau}-{kind}".format(
    **MIROSTAT[i]))
def test_mirostat_keeps_what_llama_cpps_keeps_step_by_step(i):
    """A replay of llama.cpp's mirostat run drawing the tokens it drew: at each step the same
    tokens kept, so the target moved as llama.cpp's did."""
    case = MIROSTAT[i]
    o = ChainOptions(mirostat=case["mirostat"], mirostat_tau=case["mirostat_tau"], mirostat_eta=case["mirostat_eta"])
    mu = 2 * o.mirostat_tau
    for j in range(case["steps"]):
        logits = torch.from_numpy(VECTORS[f"miro{i}.{j}.logits"])
        kept = mirostat_kept(Kept(None, logits), o, mu, case["n"])
        want = VECTORS[f"miro{i}.{j}.kept"]
        assert sorted(kept.ids.tolist()) == sorted(want.tolist()), (j, len(kept.ids), len(want))
        chosen = int(VECTORS[f"miro{i}.{j}.chosen"])
        mu = mirostat_mu(mu, float(kept.probs()[kept.ids.tolist().index(chosen)]), o)


@pytest.mark.parametrize("i", range(len(ADAPTIVE)), ids=lambda i: "target{adaptive_target}-decay{adaptive_decay}-{kind}"
                         .format(**ADAPTIVE[i]))
def test_adaptive_p_transforms_as_llama_cpps_step_by_step(i):
    """A replay of llama.cpp's adaptive-p run drawing the tokens it drew: each step's transformed
    distribution within 3e-5 (relative, float32 both) of libllama's, the average moved alike: torch's
    float32 exp and sums differ by CPU kernel (AVX-512 within 1e-5; AVX2's, ATEN_CPU_CAPABILITY=avx2,
    1.1e-5 by a run's fifth step, its moving average carrying the difference on)."""
    from qvl.runtime import sampling

    case = ADAPTIVE[i]
    p = SamplingParams(temperature=1.0, chain=ChainOptions(("adaptive_p",), adaptive_target=case["adaptive_target"],
                                                           adaptive_decay=case["adaptive_decay"]))
    gen = torch.Generator()
    for j in range(case["steps"]):
        ids, probs = candidates(torch.from_numpy(VECTORS[f"adaptive{i}.{j}.logits"]), [], p, gen)
        ids = torch.arange(len(probs)) if ids is None else ids
        got = dict(zip(ids.tolist(), probs.tolist()))
        want = dict(zip(VECTORS[f"adaptive{i}.{j}.ids"].tolist(), VECTORS[f"adaptive{i}.{j}.probs"].tolist()))
        assert set(got) == set(want)
        for t, w in want.items():
            assert got[t] == pytest.approx(w, rel=3e-5, abs=1e-12), (j, t)
        sampling._drew(gen, p, ids, probs, ids.tolist().index(int(VECTORS[f"adaptive{i}.{j}.chosen"])))


def test_the_mirostat_runs_move_their_cut():
    """In most runs of each version the cut moves from step to step (the replay is not trivial)."""
    for version in (1, 2):
        runs = [i for i, c in enumerate(MIROSTAT) if c["mirostat"] == version]
        moving = [i for i in runs if len({len(VECTORS[f"miro{i}.{j}.kept"]) for j in range(MIROSTAT[i]["steps"])}) > 1]
        assert len(moving) >= len(runs) // 2, (version, moving)


def test_mirostat_in_a_generation_holds_its_target_per_generator():
    """sample() keeps each generation's target by its generator: two generators from one seed draw
    the same tokens, and the target moves away from 2 tau once a token is drawn."""
    from qvl.runtime import sampling

    logits = torch.randn(500, generator=torch.Generator().manual_seed(1)) * 2
    p = SamplingParams(temperature=1.0, chain=ChainOptions(mirostat=2, mirostat_tau=3.0))
    runs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(9)
        runs.append([sample(logits, [], p, gen) for _ in range(30)])
        assert sampling._MU[gen] != 6.0
    assert runs[0] == runs[1] and len(set(runs[0])) > 1


def test_the_vectors_cover_every_sampler_and_its_effect():
    """Each filter drops tokens in some case (the oracle does not only keep everything)."""
    dropped: set[str] = set()
    for i, case in enumerate(CASES):
        finite_left, finite_in = np.isfinite(VECTORS[f"{i}.left"]).sum(), np.isfinite(VECTORS[f"{i}.logits"]).sum()
        if len(case["steps"]) == 1 and finite_left < finite_in:
            dropped.add(case["steps"][0]["sampler"])
    assert dropped == {"typ_p", "top_n_sigma", "xtc"}


@pytest.mark.parametrize("value, order", [
    (["top_k", "Top-P", "minp", "temp", "nucleus", "typ", "top-n-sigma", "PENALTIES", "xtc"],
     ("top_k", "top_p", "min_p", "temperature", "top_p", "typ_p", "top_n_sigma", "penalties", "xtc")),
    ("edskypmxt", ORDER_LLAMACPP),
    ("", ()),
])
def test_orders_read_as_llama_cpp_reads_them(value, order):
    assert parse_order(value) == order


@pytest.mark.parametrize("value, message", [
    (["top_k", "infill"], "infill is a sampler qvl does not have"),
    ("ki", "infill is a sampler qvl does not have"),
    (["top_k", "beam"], "'beam' is not a sampler"),
    ("kz", "'z' is not a sampler's character"),
    (3, "a list of sampler names or a string"),
])
def test_orders_qvl_cannot_follow_are_refused_by_name(value, message):
    with pytest.raises(SamplingError, match=message):
        parse_order(value)


@pytest.mark.parametrize("kwargs, message", [
    ({"xtc_probability": 1.5}, "xtc_probability 1.5: between 0 and 1"),
    ({"typical_p": math.nan}, "typical_p nan: a finite number"),
    ({"dynatemp_exponent": math.inf}, "dynatemp_exponent inf"),
    ({"adaptive_decay": 1.0}, "adaptive_decay 1.0: between 0 and 0.99"),
    ({"adaptive_target": 1.5}, "adaptive_target 1.5: 1 or below"),
])
def test_bad_options_are_refused_by_name(kwargs, message):
    with pytest.raises(SamplingError, match=message):
        ChainOptions(**kwargs)


def test_temperature_first_by_default_and_last_in_llama_cpps_order():
    """qvl's order tempers before top-p (as Ollama samples), llama.cpp's after: probabilities 0.5 /
    0.3 / 0.15 / 0.05 at temperature 0.5 are 0.685 / 0.247 / 0.062 / 0.007, so top-p 0.65 keeps
    the first token alone in qvl's order and the first two (0.5 < 0.65) in llama.cpp's."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert ChainOptions().order == ORDER and ORDER.index("temperature") < ORDER.index("top_p")
    ours = SamplingParams(temperature=0.5, top_p=0.65)
    theirs = SamplingParams(temperature=0.5, top_p=0.65, chain=ChainOptions(ORDER_LLAMACPP))
    ids, probs = candidates(logits, [], ours)
    assert ids.tolist() == [0] and probs.tolist() == [1.0]
    ids, probs = candidates(logits, [], theirs)
    assert ids.tolist() == [0, 1]
    assert probs.tolist() == pytest.approx([0.25 / 0.34, 0.09 / 0.34])  # tempered after the cut


def test_xtc_drops_top_choices_as_often_as_its_probability():
    """XTC at probability 0.3 and threshold 0.2 over probabilities 0.5 / 0.3 / 0.15 / 0.05: the two
    top tokens go to the likelier's loss 30 % of the time (the second kept), so token 0's share is
    0.7 x 0.5 = 0.35 and token 2's 0.7 x 0.15 + 0.3 x 0.15 / 0.5 = 0.195."""
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = SamplingParams(temperature=1.0, chain=ChainOptions(xtc_probability=0.3, xtc_threshold=0.2))
    gen = torch.Generator().manual_seed(5)
    picks = torch.tensor([sample(logits, [], p, gen) for _ in range(20_000)])
    share = torch.bincount(picks, minlength=4).double() / len(picks)
    want = torch.tensor([0.35, 0.7 * 0.3 + 0.3 * 0.6, 0.195, 0.7 * 0.05 + 0.3 * 0.1], dtype=torch.float64)
    assert (share - want).abs().max() < 0.015, share


def test_penalties_left_out_of_the_order_do_not_apply():
    logits = torch.tensor([2.0, 1.9, 0.0])
    with_pen = SamplingParams(temperature=None, repeat_penalty=2.0)
    without = SamplingParams(temperature=None, repeat_penalty=2.0, chain=ChainOptions(("top_k", "temperature")))
    assert sample(logits, [0], with_pen, torch.Generator()) == 1
    assert sample(logits, [0], without, torch.Generator()) == 0
    assert with_pen.adjusted and not without.adjusted


def test_typical_that_its_sum_never_passes_keeps_every_token():
    """typical_p just below 1 (1.0 in float32): the running sum never passes it, so every token is
    kept, as llama.cpp's loop ends without a cut (the binned prefix falls back to the whole order)."""
    logits = torch.randn(3000, generator=torch.Generator().manual_seed(4))
    p = SamplingParams(temperature=1.0, chain=ChainOptions(typical_p=0.99999999))
    ids, probs = candidates(logits, [], p)
    assert ids is None or sorted(ids.tolist()) == list(range(3000))
    assert probs.numel() == 3000
