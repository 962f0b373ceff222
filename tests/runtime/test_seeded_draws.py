"""Seeded draws as llama.cpp makes them (runtime/llama_random.py): the C++ generator and
distributions against numbers a libstdc++ build printed, and sampling.sample with a seed against
libllama's own chains and llama_sampler_dist with that seed (llamacpp-sampler-vectors.npz,
scripts/build_sampler_vectors.py): the same tokens, draw after draw, for chains that leave the
candidates in the vocabulary's order, sort them, put them in typical's order or fire XTC from its
own generator; mirostat's and adaptive-p's runs likewise draw the tokens libllama drew."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from qvl.runtime.llama_random import StdMt19937, canonical, canonical_f32, discrete, dist_pick, softmax_f32
from qvl.runtime.sampler_chain import ChainOptions
from qvl.runtime.sampling import SamplingParams, sample

VECTORS = np.load(Path(__file__).with_name("llamacpp-sampler-vectors.npz"))
DRAWS = json.loads(str(VECTORS["draws"]))
MIROSTAT = json.loads(str(VECTORS["mirostat"]))
ADAPTIVE = json.loads(str(VECTORS["adaptive"]))
CHAIN_KEYS = ("typical_p", "top_n_sigma", "xtc_probability", "xtc_threshold", "dynatemp_range", "dynatemp_exponent")


def test_the_generator_and_distributions_equal_libstdcxx():
    """g++ 12: std::mt19937 a(5489), its 10000th word (the standard's check); r(299792458), three
    uniform_real_distribution<double>(0, 1) then three <float>; q(7), discrete_distribution over
    {.1, .2, .3, .4} twelve times; one weight: 0 with no word drawn."""
    a = StdMt19937(5489)
    for _ in range(9999):
        a()
    assert a() == 4123659995
    r = StdMt19937(299792458)
    assert [canonical(r) for _ in range(3)] == [0.081233352334815184, 0.71585105212606837, 0.75551380018494174]
    assert [float(canonical_f32(r)) for _ in range(3)] == [
        float(np.float32(x)) for x in (0.931734085, 0.841748118, 0.586174369)]
    q = StdMt19937(7)
    assert [discrete(q, np.array([0.1, 0.2, 0.3, 0.4], np.float32)) for _ in range(12)] == [
        1, 2, 3, 2, 2, 1, 0, 2, 0, 2, 3, 2]
    q = StdMt19937(7)
    assert discrete(q, np.ones(1, np.float32)) == 0 and q() == StdMt19937(7)()


def test_dist_draws_against_the_running_sum_in_order():
    """llama_sampler_dist: one canonical u a draw (a single candidate too); the first candidate, in
    the given order, whose running sum of expf(logit - max) reaches u x the sum."""
    logits = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    gen, twin = StdMt19937(3), StdMt19937(3)
    for _ in range(20):
        u = canonical(twin)
        assert dist_pick(gen, logits) == (0 if u <= 0.5 else 1 if u <= 0.75 else 2)
    assert dist_pick(gen, torch.zeros(1)) == 0 and gen() == (canonical(twin), twin())[1]
    assert dist_pick(StdMt19937(3), torch.tensor([-math.inf, 0.0, -math.inf])) == 1
    assert softmax_f32(np.array([0.0, np.log(3.0)], np.float32)).tolist() == pytest.approx([0.25, 0.75], rel=1e-7)


def _llama_dist(gen: StdMt19937, logits: np.ndarray) -> int:
    """llama_sampler_dist_apply's loop as written: expf, then a float64 running sum, one by one."""
    u = canonical(gen)
    p = np.exp((logits - logits.max()).astype(np.float64)).astype(np.float32)
    total = 0.0
    for x in p:
        total += float(x)
    run = 0.0
    for i, x in enumerate(p):
        run += float(x)
        if run >= total * u:
            return i
    return len(p) - 1


@pytest.mark.parametrize("n", [2, 7, 1023, 1024, 1025, 5000])
def test_dist_pick_by_blocks_and_by_sorted_bins_equals_the_loop(n):
    """The block sums (and, with a sort key, the bins of it) give the token llama.cpp's loop gives,
    over the candidates as given or sorted largest key first: 60 seeds each, over spread, flat and
    -inf-holding logits; the key a monotone function of the logits (a temperature before them)."""
    rng = np.random.default_rng(n)
    for kind in ("spread", "flat", "banned"):
        x = (rng.standard_normal(n) * (3.0 if kind != "flat" else 0.01)).astype(np.float32)
        if kind == "banned":
            x[rng.choice(n, n // 3, replace=False)] = -np.inf
        order = np.argsort(-x, kind="stable")
        for seed in range(60):
            assert dist_pick(StdMt19937(seed), torch.from_numpy(x)) == _llama_dist(StdMt19937(seed), x)
            got = dist_pick(StdMt19937(seed), torch.from_numpy(x), torch.from_numpy(x * 1.7))
            assert got == order[_llama_dist(StdMt19937(seed), x[order])], (kind, seed)


def _params(steps: list[dict], seed: int) -> SamplingParams:
    values: dict = {"temperature": 1.0, "seed": seed}
    chain: dict = {}
    for step in steps:
        for key, value in step.items():
            if key in CHAIN_KEYS:
                chain[key] = value
            elif key != "sampler":
                values[key] = value
    return SamplingParams(**values, chain=ChainOptions(tuple(s["sampler"] for s in steps), **chain))


def _run(params: SamplingParams, logits: list[torch.Tensor]) -> list[int]:
    """sample() over the logits with one generation's generator seeded as Model.generate seeds it,
    each token in the history of the next."""
    gen, history = torch.Generator().manual_seed(params.seed), []
    for x in logits:
        history.append(sample(x, history, params, gen))
    return history


@pytest.mark.parametrize("i", range(len(DRAWS)), ids=lambda i: "{chain}-{seed}-{logits}{n}".format(**DRAWS[i]))
def test_seeded_draws_are_llama_cpps(i):
    case = DRAWS[i]
    logits = torch.from_numpy(VECTORS[f"draw{i}.logits"])
    got = _run(_params(case["steps"], case["seed"]), [logits] * case["draws"])
    assert got == VECTORS[f"draw{i}.ids"].tolist()


def test_the_seeded_runs_draw_many_tokens_and_depend_on_the_seed():
    """Not trivial: most runs draw several tokens, and another seed draws other tokens."""
    many = [i for i in range(len(DRAWS)) if len(set(VECTORS[f"draw{i}.ids"].tolist())) >= 3]
    assert len(many) >= 0.7 * len(DRAWS)
    other = 0
    for i in many:
        case = DRAWS[i]
        logits = torch.from_numpy(VECTORS[f"draw{i}.logits"])
        other += _run(_params(case["steps"], case["seed"] + 1), [logits] * case["draws"]) != \
            VECTORS[f"draw{i}.ids"].tolist()
    assert other == len(many)


@pytest.mark.parametrize("i", range(len(MIROSTAT)), ids=lambda i: "v{mirostat}-tau{mirostat_tau}-{kind}".format(
    **MIROSTAT[i]))
def test_mirostat_draws_llama_cpps_tokens(i):
    """libllama's mirostat run (seed 77): the same token at each step, drawn from mirostat's own generator."""
    case = MIROSTAT[i]
    p = SamplingParams(temperature=1.0, seed=77, chain=ChainOptions(
        mirostat=case["mirostat"], mirostat_tau=case["mirostat_tau"], mirostat_eta=case["mirostat_eta"]))
    steps = [torch.from_numpy(VECTORS[f"miro{i}.{j}.logits"]) for j in range(case["steps"])]
    gen = torch.Generator().manual_seed(p.seed)
    got = [sample(x, [], p, gen) for x in steps]  # mirostat takes no history
    assert got == [int(VECTORS[f"miro{i}.{j}.chosen"]) for j in range(case["steps"])]


@pytest.mark.parametrize("i", range(len(ADAPTIVE)), ids=lambda i: "target{adaptive_target}-decay{adaptive_decay}-{kind}"
                         .format(**ADAPTIVE[i]))
def test_adaptive_p_draws_llama_cpps_tokens(i):
    """libllama's adaptive-p run (seed 99): the same token at each step."""
    case = ADAPTIVE[i]
    p = SamplingParams(temperature=1.0, seed=99, chain=ChainOptions(
        ("adaptive_p",), adaptive_target=case["adaptive_target"], adaptive_decay=case["adaptive_decay"]))
    gen = torch.Generator().manual_seed(p.seed)
    got = [sample(torch.from_numpy(VECTORS[f"adaptive{i}.{j}.logits"]), [], p, gen) for j in range(case["steps"])]
    assert got == [int(VECTORS[f"adaptive{i}.{j}.chosen"]) for j in range(case["steps"])]
