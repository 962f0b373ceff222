"""`qvl perplexity` (runtime/perplexity.py, perplexity_cli.py): the text's chunks scored as
llama-perplexity scores them, each token's negative log-likelihood equal to transformers' (float32
on both sides: summation order only, so within 1e-5 nats a token, measured 7e-7), the KL
divergence and Δp equal to float64 sums over two known distributions, llama.cpp's percentiles
and uncertainties, and the command's output and one-line errors."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from qvl.runtime.cli import app
from qvl.runtime.loader import load
from qvl.runtime.perplexity import (PerplexityError, Scores, _percentile, chunk_count, mean_and_uncertainty,
                                    measure, score_chunk, summary)
from tiny_models import TinySpec, build_model, make_checkpoint, to_gguf

SPEC = TinySpec(dtype=torch.float32, seed=7)
NLL_TOL = 1e-5  # nats a token: the same float32 math in another order on both sides (measured 7e-7)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppl")
    src = make_checkpoint(d / "ckpt", SPEC)
    return {t: to_gguf(src, d / f"m-{t}.gguf", t, "f32") for t in ("f32", "q8_0", "q4_k_m")}


def _reference_nll(ids: list[int], ctx: int, n_chunks: int) -> np.ndarray:
    """transformers' -log p(token j+1 | tokens ..j) for j in the second half of each chunk."""
    model = build_model(SPEC).float().eval()
    out = []
    for c in range(n_chunks):
        chunk = torch.tensor(ids[c * ctx:(c + 1) * ctx])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=chunk[None]).logits[0].double(), -1)
        first = ctx // 2
        out.append(-lp[torch.arange(first, ctx - 1), chunk[first + 1:]].numpy())
    return np.concatenate(out)


@pytest.mark.parametrize("ctx,chunks", [(24, None), (17, 2)])  # every whole chunk; the first 2 of an odd size
def test_token_nll_and_ppl_equal_transformers(tiny, ctx, chunks):
    ids = torch.randint(0, 1000, (3 * ctx + 7,), generator=torch.Generator().manual_seed(ctx)).tolist()
    model = load(tiny["f32"], device="cpu")
    seen = []
    scores = measure(model, ids, ctx, chunks, each=lambda i, n, so_far: seen.append((i, n, len(so_far.nll))))
    n = chunks or 3
    per_chunk = ctx - 1 - ctx // 2
    assert seen == [(i, n, (i + 1) * per_chunk) for i in range(n)]
    want = _reference_nll(ids, ctx, n)
    assert scores.nll.shape == want.shape and np.abs(scores.nll - want).max() <= NLL_TOL
    s = summary(scores)
    assert s["tokens"] == len(want) and "kld" not in s
    assert math.isclose(s["ppl"], math.exp(want.mean()), rel_tol=NLL_TOL)
    sd = want.std()  # llama.cpp's: the population deviation over sqrt(n - 1), times the PPL
    assert math.isclose(s["ppl_uncertainty"], s["ppl"] * sd / math.sqrt(len(want) - 1), rel_tol=1e-2)


class _Fixed:
    """A stand-in model whose logits at each position are given rows (hidden = the rows)."""

    def __init__(self, logits: torch.Tensor):
        self.rows = logits
        self.cfg = SimpleNamespace(n_vocab=logits.shape[1])
        self.decoder = SimpleNamespace(logits=lambda h: h)

    def token_hidden(self, ids):
        return [self.rows[:len(ids) // 2], self.rows[len(ids) // 2:len(ids)]]


def test_kl_divergence_and_p_diff_are_the_sums_over_both_distributions():
    gen = torch.Generator().manual_seed(0)
    q, b = torch.randn(40, 50, generator=gen) * 3, torch.randn(40, 50, generator=gen) * 3
    b[30] = q[30] + 0.5  # one position with the same distribution: KL 0, Δp 0
    ids = torch.randint(0, 50, (40,), generator=gen).tolist()
    got = score_chunk(_Fixed(q), ids, _Fixed(b))
    lq, lb = torch.log_softmax(q.double(), -1)[20:39], torch.log_softmax(b.double(), -1)[20:39]
    target = torch.tensor(ids[21:40])
    np.testing.assert_allclose(got.nll, -lq[torch.arange(19), target].numpy(), rtol=1e-5)
    np.testing.assert_allclose(got.nll_base, -lb[torch.arange(19), target].numpy(), rtol=1e-5)
    kl = (lb.exp() * (lb - lq)).sum(-1).numpy()
    np.testing.assert_allclose(got.kld, kl, rtol=1e-4, atol=1e-7)
    assert abs(got.kld[10]) < 1e-6 and (got.kld >= -1e-7).all()
    np.testing.assert_allclose(got.p_diff, (lq.exp() - lb.exp())[torch.arange(19), target].numpy(), atol=1e-7)
    np.testing.assert_array_equal(got.same_top, (lq.argmax(-1) == lb.argmax(-1)).numpy())
    assert got.same_top[10] and not got.same_top.all()


def test_a_model_against_itself_and_quantizations_against_f32(tiny):
    """KL 0 and every top token the same against itself; against F32, Q8_0's KL divergence is
    small and Q4_K_M's larger (fewer bits: more of the distribution moves)."""
    ids = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    f32 = load(tiny["f32"], device="cpu")
    same = summary(measure(f32, ids, 32, base=f32))
    assert same["kld"] == 0 and same["same_top"] == 1 and same["ln_ppl_ratio"] == 0 and same["p_diff_rms"] == 0
    kld = {t: summary(measure(load(tiny[t], device="cpu"), ids, 32, base=f32))["kld"] for t in ("q8_0", "q4_k_m")}
    print(kld)
    assert 0 < kld["q8_0"] < kld["q4_k_m"] < 0.1, kld


def test_llama_cpp_statistics():
    values = np.random.default_rng(0).normal(size=101) ** 2
    ordered = np.sort(values)
    for f in (0.001, 0.01, 0.5, 0.9, 0.999):
        assert math.isclose(_percentile(ordered, f), np.percentile(values, 100 * f), rel_tol=1e-12)
    mean, unc = mean_and_uncertainty(values)
    assert math.isclose(unc, values.std() / math.sqrt(100), rel_tol=1e-9)
    nll = np.array([1.0, 2.0, 3.0, 4.0])
    base = nll * 0.5 + 0.1
    s = summary(Scores(nll, base, np.full(4, 0.01), np.zeros(4), np.array([True, True, True, False])))
    assert math.isclose(s["ln_ppl_correlation"], 1.0, rel_tol=1e-9)  # base is a linear function of nll
    assert math.isclose(s["ln_ppl_ratio"], nll.mean() - base.mean())
    assert s["same_top"] == 0.75 and math.isclose(s["same_top_uncertainty"], math.sqrt(0.75 * 0.25 / 3))


@pytest.mark.parametrize("n,ctx,chunks,expect", [
    (100, 50, None, 2), (149, 50, None, 2), (150, 50, 2, 2), (1000, 50, 3, 3),
    (99, 50, None, "the text is 99 tokens: a context of 50 needs 100"), (100, 3, None, "context 3: 4 tokens or more"),
    (100, 50, 0, "chunks 0: 1 or more"),
])
def test_chunk_count(n, ctx, chunks, expect):
    if isinstance(expect, int):
        assert chunk_count(n, ctx, chunks) == expect
    else:
        with pytest.raises(PerplexityError, match=expect):
            chunk_count(n, ctx, chunks)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = np.random.default_rng(3)
    words = "the cat sat on a mat and looked at one dog that ran over the hill".split()
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(" ".join(rng.choice(words, 200)), encoding="utf-8")
    return path


def test_the_command_prints_llama_perplexitys_figures(tiny, text_file):
    r = CliRunner().invoke(app, ["perplexity", str(tiny["q8_0"]), "-f", str(text_file), "-c", "64",
                                 "--base", str(tiny["f32"])])
    assert r.exit_code == 0, r.output
    out = r.stdout.splitlines()
    assert out[0].startswith("Final estimate: PPL = ") and "tokens scored" in out[0]
    for label in ("Mean PPL(Q)", "Mean PPL(base)", "Mean    KLD:", "99.9%   KLD:", " 5.0%   KLD:", "Median  KLD:",
                  "RMS Δp    :", "Same top p:"):
        assert any(line.startswith(label) for line in out), label
    assert "s a chunk, ETA" in r.stderr and "[1/" in r.stderr
    j = CliRunner().invoke(app, ["perplexity", str(tiny["q8_0"]), "-f", str(text_file), "-c", "64", "--json",
                                 "--chunks", "2"])
    assert j.exit_code == 0, j.output
    got = json.loads(j.stdout)
    assert got["chunks"] == 2 and len(got["chunk_ppl"]) == 2 and got["tokens"] == 2 * (64 - 1 - 32)
    assert got["chunk_ppl"][-1] == got["ppl"] and got["base"] is None and "kld" not in got


def test_errors_are_one_line(tiny, text_file, tmp_path, fixtures_dir):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe text")
    short = tmp_path / "short.txt"
    short.write_text("only a few words", encoding="utf-8")
    other = fixtures_dir / "tiny-qwen2-vl" / "llamacpp" / "tiny-qwen2-vl-f16.gguf"  # the whole Qwen vocabulary
    for args, expect in (
        (["-f", str(tmp_path / "none.txt")], "none.txt: No such file or directory"),
        (["-f", str(bad)], "bad.txt: not UTF-8 text"),
        (["-f", str(short)], "a context of 512 needs 1024 or more (a longer text, or a smaller --ctx-size)"),
        (["-f", str(text_file), "-c", "64", "--chunks", "0"], "chunks 0: 1 or more"),
        (["-f", str(text_file), "-c", "64", "--base", str(other)], "not the same model"),
        (["-f", str(text_file), "-c", "40000"], "context 40000: the model reads at most 4096 tokens"),  # TinySpec's
    ):
        r = CliRunner().invoke(app, ["perplexity", str(tiny["q8_0"]), *args])
        assert r.exit_code == 2 and isinstance(r.exception, (SystemExit, type(None))), r.output
        assert r.stderr.startswith("qvl perplexity: error: ") and expect in r.stderr and r.stderr.count("\n") == 1, \
            r.stderr
