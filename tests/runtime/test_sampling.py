"""Next-token sampling: each filter keeps exactly the tokens llama.cpp's sampler keeps, draws follow
the distribution left, and out-of-range parameters are refused by name."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from qvl.runtime.sampling import (SamplingError, SamplingParams, apply_count_penalties, apply_repeat_penalty, candidates,
                                  sample, sampling_params)

REPO = Path(__file__).resolve().parents[2]

# probabilities 0.5, 0.3, 0.15, 0.05 at temperature 1 (ids 3, 0, 2, 1: not in id order)
PROBS = {3: 0.5, 0: 0.3, 2: 0.15, 1: 0.05}
LOGITS = torch.tensor([math.log(PROBS[i]) for i in range(4)])


def draws(params: SamplingParams, n: int = 2000, logits: torch.Tensor = LOGITS) -> list[int]:
    gen = torch.Generator().manual_seed(params.seed)
    return [sample(logits, [], params, gen) for _ in range(n)]


@pytest.mark.parametrize("temperature", [None, 0.0, -1.0])
def test_greedy_when_temperature_is_absent_zero_or_negative(temperature):
    assert set(draws(SamplingParams(temperature=temperature), 50)) == {3}


@pytest.mark.parametrize("params,kept", [
    (SamplingParams(temperature=1.0), {3, 0, 2, 1}),
    (SamplingParams(temperature=1.0, top_k=2), {3, 0}),
    (SamplingParams(temperature=1.0, top_k=1), {3}),
    (SamplingParams(temperature=1.0, top_k=0), {3, 0, 2, 1}),  # 0: off
    (SamplingParams(temperature=1.0, top_p=0.6), {3, 0}),  # 0.5 < 0.6 keeps the second, 0.8 stops
    (SamplingParams(temperature=1.0, top_p=0.85), {3, 0, 2}),
    (SamplingParams(temperature=1.0, top_p=0.0), {3}),  # the most likely token always stays
    (SamplingParams(temperature=1.0, top_p=1.0), {3, 0, 2, 1}),
    (SamplingParams(temperature=1.0, min_p=0.5), {3, 0}),  # >= 0.25
    (SamplingParams(temperature=1.0, min_p=0.09), {3, 0, 2, 1}),  # >= 0.045
])
def test_filters_keep_the_right_tokens(params, kept):
    assert set(draws(params)) == kept


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_draws_follow_the_tempered_distribution(temperature):
    n = 4000
    got = draws(SamplingParams(temperature=temperature, seed=11), n)
    want = torch.softmax(LOGITS / temperature, dim=0)
    for i in range(4):
        # binomial standard deviation is at most sqrt(0.25 / 4000) = 0.008: 0.03 is over 3.5 of them
        assert abs(got.count(i) / n - float(want[i])) < 0.03, (i, got.count(i) / n, float(want[i]))


def test_top_p_renormalizes_what_it_keeps():
    n = 4000
    got = draws(SamplingParams(temperature=1.0, top_p=0.6, seed=5), n)
    assert abs(got.count(3) / n - 0.5 / 0.8) < 0.03


def test_same_seed_same_draws():
    p = SamplingParams(temperature=1.0, seed=42)
    assert draws(p, 100) == draws(p, 100)
    assert draws(p, 100) != draws(SamplingParams(temperature=1.0, seed=43), 100)


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = apply_repeat_penalty(logits, [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]
    assert logits.tolist() == [2.0, -2.0, 1.0, 0.5]  # not in place


@pytest.mark.parametrize("last_n,penalized", [(2, {1, 2}), (0, set()), (-1, {0, 1, 2}), (10, {0, 1, 2})])
def test_repeat_last_n_picks_the_window(last_n, penalized):
    # history 0, 1, 2 (oldest first); a penalty of 100 puts a penalized token below every other
    params = SamplingParams(repeat_penalty=100.0, repeat_last_n=last_n)
    for logits in ([1.0, 0.2, 0.3, 0.9], [0.1, 0.2, 0.3, 0.05], [0.1, 0.3, 0.2, 0.05]):
        best = max((v, i) for i, v in enumerate(logits) if i not in penalized)[1]
        assert sample(torch.tensor(logits), [0, 1, 2], params, torch.Generator()) == best


def test_frequency_and_presence_penalties_subtract_per_count_and_once():
    """OpenAI's: logit - count * frequency - (count > 0) * presence, after the repeat penalty (llama.cpp's order)."""
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    out = apply_count_penalties(logits, [0, 1, 1, 1], frequency=0.5, presence=0.25)
    assert out.tolist() == [2.0 - 0.5 - 0.25, -2.0 - 1.5 - 0.25, 1.0, 0.5]
    assert logits.tolist() == [2.0, -2.0, 1.0, 0.5]  # not in place
    assert apply_count_penalties(logits, [0, 1], 0.0, 0.0) is logits
    both = SamplingParams(repeat_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25, repeat_last_n=3)
    # history 3, 0, 1, 1 and a window of 3: token 0 once, token 1 twice; 3 is outside it
    want = torch.tensor([2.0 / 2 - 0.5 - 0.25, -2.0 * 2 - 1.0 - 0.25, 1.0, 0.5])
    for sign in (1, -1):  # greedy: the argmax of the penalized logits, for either order of the unpenalized ones
        raw = torch.tensor([2.0, -2.0, 1.0, 0.5 * 3 ** (sign > 0)])
        expect = want.clone()
        expect[3] = raw[3]
        assert sample(raw, [3, 0, 1, 1], both, torch.Generator()) == int(torch.argmax(expect))
    assert sample(torch.tensor([2.0, 1.9, 0.0]), [0], SamplingParams(presence_penalty=0.2), torch.Generator()) == 1
    assert sample(torch.tensor([2.0, 1.9, 0.0]), [0], SamplingParams(presence_penalty=0.05), torch.Generator()) == 0
    assert sample(torch.tensor([2.0, 1.0, 0.0]), [0, 0, 0], SamplingParams(frequency_penalty=0.4),
                  torch.Generator()) == 1  # 2.0 - 3 * 0.4 = 0.8 < 1.0
    assert SamplingParams(presence_penalty=-0.5).adjusted and not SamplingParams().adjusted
    assert not SamplingParams(frequency_penalty=1.0, repeat_last_n=0).adjusted  # no window: nothing penalized


def test_logit_bias_is_added_first_and_minus_inf_bans():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    greedy = SamplingParams(logit_bias=((0, -1.5),))
    assert sample(logits, [], greedy, torch.Generator()) == 1  # 0.5 < 1.0
    assert SamplingParams(logit_bias=((3, 4.0),)).adjusted
    banned = SamplingParams(temperature=1.0, logit_bias=((0, -math.inf), (1, -math.inf)), seed=4)
    assert set(draws(banned, 300, logits)) == {2, 3}
    # before the repeat penalty (llama.cpp's chain): 2.0 - 3.0 = -1.0, then x 2 = -2.0 < -1.0 of token 3
    both = SamplingParams(logit_bias=((0, -3.0), (1, -5.0), (2, -5.0)), repeat_penalty=2.0)
    assert sample(logits, [0], both, torch.Generator()) == 3
    params = sampling_params({"seed": 7, "logit_bias": {1: 2.0}}, {"temperature": None, "logit_bias": {"5": -1}}, 10)
    assert params.logit_bias == ((5, -1.0),) and params.seed == 7  # given wins; JSON's string keys read as ids
    with pytest.raises(SamplingError, match="logit_bias 10: not a token id of this model"):
        sampling_params({}, {"logit_bias": {10: 1.0}}, 10)


@pytest.mark.parametrize("kwargs,name", [
    ({"presence_penalty": float("nan")}, "presence_penalty"),
    ({"logit_bias": ((1, math.inf),)}, "logit_bias"),
    ({"logit_bias": ((-1, 1.0),)}, "logit_bias"),
    ({"logit_bias": ((1, math.nan),)}, "logit_bias"),
    ({"frequency_penalty": float("-inf")}, "frequency_penalty"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": -0.1}, "top_p"),
    ({"min_p": 2.0}, "min_p"),
    ({"repeat_penalty": 0.0}, "repeat_penalty"),
    ({"repeat_penalty": -1.0}, "repeat_penalty"),
    ({"repeat_last_n": -2}, "repeat_last_n"),
])
def test_out_of_range_parameters_are_refused_by_name(kwargs, name):
    with pytest.raises(SamplingError, match=f"^{name} "):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("params,kept", [
    (SamplingParams(temperature=0.8), 152_064),
    (SamplingParams(temperature=0.8, top_k=40), 40),
    (SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1), 31),
    (SamplingParams(temperature=0.4, top_p=0.9), 24),  # top-p's cut inside the first 64 taken
    (SamplingParams(temperature=0.45, top_p=0.9), 97),  # past 64: 512 are taken
    (SamplingParams(temperature=0.6, top_p=0.9), 2556),  # past 512
    (SamplingParams(temperature=0.7, top_p=0.9), 8004),  # past 4096
    (SamplingParams(temperature=1.5, top_p=0.999), 146_112),  # past 32768: the whole vocabulary
    (SamplingParams(temperature=1.0, top_p=0.5, min_p=0.01), 1033),
    (SamplingParams(temperature=1.0, min_p=0.2), 9),
    (SamplingParams(temperature=1.0, top_k=151_000, top_p=0.8), 18_346),
])
def test_candidates_match_the_filters_over_the_sorted_vocabulary(params, kept):
    """Against the sampler as first written (scripts/bench_sampling.py, its baseline), which
    sorted the whole vocabulary."""
    spec = importlib.util.spec_from_file_location("bench_sampling", REPO / "scripts" / "bench_sampling.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(152_064, generator=gen) * 2  # Qwen's vocabulary, a spread-out distribution
    history = torch.randint(0, 152_064, (100,), generator=gen).tolist()
    want = bench.full_vocab_distribution(logits, history, params)
    # the case exercises what its comment says; under top-p, the oracle's own float32 running sum
    # puts the cut one token either way on another CPU's vector code (AVX2: 8004, 146112, 18346;
    # AVX-512: 8005, 146113, 18345), which leaves each case in its range
    assert abs(int((want > 0).sum()) - kept) <= (1 if params.top_p else 0)
    ids, probs = candidates(logits, history, params)
    got = torch.zeros_like(want)
    if ids is None:
        got = probs
    else:
        got[ids] = probs
    # top-p compares a float32 running sum of thousands of probabilities with top_p: the token
    # at the cut can fall either side (8005 against 8004 kept at temperature 0.7)
    differ = (got > 0) != (want > 0)
    assert int(differ.sum()) <= (1 if params.top_p else 0), (int((got > 0).sum()), kept)
    got[differ], want[differ] = 0.0, 0.0
    got, want = got / got.sum(), want / want.sum()  # the draw's distribution: over what is kept
    # the normalizer: a float32 sum over up to 152k terms in another order (logsumexp against
    # softmax), ~sqrt(152k) ulps: 2.5e-5 relative seen
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-9)


def test_top_k_keeps_the_tokens_tied_with_the_kth():
    logits = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 0.5])
    ids, probs = candidates(logits, [], SamplingParams(temperature=1.0, top_k=2))
    assert sorted(ids[probs > 0].tolist()) == [0, 2, 3, 4]


def test_a_draw_never_picks_a_token_min_p_dropped():
    # the last id has no probability left: a uniform draw close to 1 must still land before it
    logits = torch.tensor([0.0, 0.0, -30.0])
    params = SamplingParams(temperature=1.0, min_p=0.5)
    gen = torch.Generator().manual_seed(0)
    assert {sample(logits, [], params, gen) for _ in range(2000)} == {0, 1}


def test_seed_minus_one_is_a_random_seed_as_llama_cpps():
    """-1 and 4294967295 (llama.cpp's LLAMA_DEFAULT_SEED) each become a random seed below it; any
    other seed is kept."""
    seeds = {sampling_params({}, {"seed": s, "temperature": 1.0}, 10).seed for s in (-1, 0xFFFFFFFF) * 8}
    assert len(seeds) >= 15 and all(0 <= s < 0xFFFFFFFF for s in seeds)
    assert sampling_params({"seed": -1}, {}, 10).seed != -1  # a stored model's seed -1 too
    assert sampling_params({}, {"seed": 0xFFFFFFFE}, 10).seed == 0xFFFFFFFE
